"""Measure: what a model's layers are and how much they matter, before anything changes.

The QLIS score and the inspection report (stats), weight and output errors (distortion), which
layers to compress (select), and calibration on the user's data: running the model on its
batches (calibrate) and seeing what each kind of layer receives (layer_inputs). These modules
read a model; none of them changes one.
"""
