"""Driving a whole model through GPTQ, one decoder layer at a time.

- ``calibration``: the calibration samples
- ``plan``: which modules get which settings, checked against their shapes up front
- ``capture``: the inputs of decoder layers (a public API the perplexity stream uses too)
- ``mover``: layers on and off the accelerator, on a side stream
- ``hessians``: each group's Hessian (and GPTAQ's cross term) from a layer's forward pass
- ``driver``: the loop over layers: solves, packing, the next layer's inputs
- ``eval_stream``: held-out perplexity before and after, measured in the same pass
- ``state``: finished layers on disk, to resume after a crash
- ``run``: the ``quantize`` command end to end: load, quantize, write, validate, publish
"""
