"""Super-resolution models and the machinery that trains and applies them (paper sections 2.2, 3.1).

``base``: the contract between a model and the machinery (:class:`SRModel`, :class:`StepContext`).
``networks``, ``losses``: generators, discriminators, perceptual and adversarial losses.
``gan``: SRGAN and Real-ESRGAN+ as :class:`SRModel` s.  ``registry``: model name -> class.
``data``: split and patch sampling.  ``train``: the training loop, checkpoints and resume.
``infer``: inference over whole volumes.
"""
