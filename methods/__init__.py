"""Attribution methods: each is `(model, x, target, *, hyperparameters) -> Tensor (B, C, H, W)`.

Every public method is wrapped by methods._common.attribution_method: inputs are
checked, gradients enabled, the model's modes, hooks and requires_grad flags
restored on exit (even on error) and the result detached, on x's device and dtype.
The catalogue is conf/method/*.yaml; `python -m bench.catalog methods` prints it.
"""
from methods._common import attribution_method
from metrics.checks import Unsupported  # noqa: F401 - what cannot_run raises (not a method)
from methods.cam import grad_cam, grad_cam_plus_plus, guided_grad_cam, last_spatial_layer, layer_cam, score_cam
from methods.controls import centre, constant, edge, random_map
from methods.gradient import (deconvolution, gradient, gradient_x_input, guided_backprop, saliency, smoothgrad,
                              smoothgrad_squared, vargrad)
from methods.lrp import lrp_alpha1_beta0, lrp_epsilon, lrp_epsilon_gamma_box, lrp_epsilon_plus_flat, lrp_gamma
from methods.perturbation import feature_ablation, grid_segments, kernel_shap, lime, occlusion, rise
from methods.reference import deeplift, deeplift_shap, expected_gradients, integrated_gradients

__all__ = [
    # gradient family
    "gradient", "saliency", "gradient_x_input", "integrated_gradients", "smoothgrad", "smoothgrad_squared",
    "vargrad", "expected_gradients", "deeplift", "deeplift_shap", "guided_backprop", "deconvolution",
    # CAM family
    "grad_cam", "guided_grad_cam", "grad_cam_plus_plus", "score_cam", "layer_cam", "last_spatial_layer",
    # LRP family
    "lrp_epsilon", "lrp_gamma", "lrp_alpha1_beta0", "lrp_epsilon_plus_flat", "lrp_epsilon_gamma_box",
    # perturbation family
    "occlusion", "rise", "lime", "kernel_shap", "feature_ablation", "grid_segments",
    # controls
    "random_map", "edge", "centre", "constant",
    "attribution_method",
]
