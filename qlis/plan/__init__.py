"""Plan: which pruner and quantizer each layer gets, and carrying that out.

The policies (policy: the paper's LAP/LAQ/LAPQ and friends; rd: rate-distortion allocation
over the curves of allocate), the plan they produce (plans), the size model that prices it
(sizes), the execution of one layer's plan (execute) and of a whole plan (plan_executor), and
`qlis.compress`, which ties measure, plan and quantize together (compress).
"""
