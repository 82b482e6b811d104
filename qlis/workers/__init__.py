"""Workers: independent work side by side, with results in a fixed order.

Threads in one process with a bounded window of work in flight (threads), and the ranks of a
torch.distributed job under ``torchrun`` (cluster).
"""
