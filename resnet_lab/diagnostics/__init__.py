"""Why deep plain nets degrade: four diagnostics on matched plain and residual nets (issue 16).

One module per measurement, each a function ``(model, tensors on the device, settings) ->
(tidy DataFrame, {metric name: float})`` that leaves the model's weights, buffers and
train flags exactly as it found them:

* ``lesion``: Veit et al. 2016, test error with blocks deleted.
* ``landscape``: Li et al. 2018, filter-normalised loss slices and the init-to-final path.
* ``curvature``: Yao et al. 2020 (PyHessian's method), top Hessian eigenvalue and trace.
* ``shattering``: Balduzzi et al. 2017, correlation of input gradients along a line.

Sizes live in ``settings`` (full scale and a CPU preset).
"""
