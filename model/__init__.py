"""reelforge inference: everything a trained checkpoint needs, as plain single-device PyTorch.

Modules (import what you use; this package imports nothing, so `import model` stays cheap and
needs only torch):

    dit              the spacetime diffusion transformer (DiTConfig, DIT_PRESETS, DiT)
    rectified_flow   noise path, training loss, Euler sampler
    conditioning     which latent frames are held clean, per generation mode
    autoencoders     pixels <-> latents: "pixel" (lossless), "wan:", "cogvideox:", "kl:" (diffusers)
    text_encoders    prompts -> token embeddings: "minilm" (offline), "t5:", "clip:" (transformers)
    bundle           the inference bundle (model_config.json + weights.safetensors) and its
                     typed config (BundleConfig, GenerationDefaults)
    pipeline         VideoPipeline: text / image / extend / connect / edit, any length
    video_io         video and image files -> uint8 frames <-> model tensors
    mp4              uint8 frames -> H.264 MP4: the one MP4 writer (imports no torch)
    specs            how configs and bundles name components: `kind` or `kind:location`
    storage          URI -> pyarrow filesystem, sha256 of files and folders, config hashes
    errors           an exception as one line
    pyfunc           the registered MLflow model (the one module here that imports mlflow)

The `reelforge generate` command that drives VideoPipeline is infra/generate.py.
"""

# The reelforge version, here because model/ is the package every other one may import and the one
# that ships alone inside a registered model, where no installed distribution can be asked.
# pyproject.toml reads it from here; infra re-exports it.
__version__ = "0.1.0"
