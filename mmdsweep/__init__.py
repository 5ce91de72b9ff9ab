"""mmdsweep: MMD-DDM fine-tuning of pretrained diffusion models and hyper-parameter sweeps."""

__version__ = "0.1.0"
