"""Quantized checkpoints edited in their own format: FP8 (block-scaled and per-tensor/per-channel),
MXFP4 (gpt-oss experts) and NVFP4.

:mod:`.numerics` holds the element grids (E4M3, E2M1, E8M0) and the per-block scale search,
:mod:`.fp8`, :mod:`.mxfp4` and :mod:`.nvfp4` the codecs (numpy only: the ablate stage never imports
torch), :mod:`.registry` maps a checkpoint's ``quantization_config`` and tensor names to a codec
(and refuses every other quantization method in one line), :mod:`.rewrite` edits one shard's
quantized tensors (de-quantize, the bf16 edit in float32, quantize back with fresh scales) and
:mod:`.check` compares an edited tensor de-quantized for ``verify``.
"""
