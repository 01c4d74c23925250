"""Layer-streamed forward passes, for models larger than the memory of the device.

The model is built by transformers itself (``from_pretrained``) with every decoder layer offloaded
to disk: the embeddings, final norm, head and rotary tables are loaded, each layer's parameters
stay on the meta device, and transformers records where each one lives (the checkpoint's own
shards through their memory map; tensors that transformers converts at load time are written,
converted, to a scratch folder that :meth:`Streamed.close` deletes: MoE experts it fuses, and the
weights of a block-scaled FP8 or MXFP4 checkpoint, which it de-quantizes on a CPU, in the compute
dtype, so that scratch holds the decoder layers at 2-4 bytes a weight for 0.5-1 stored). So every
family's weight renaming, fusing and de-quantization stays the library's.

Placement (:func:`placement`): one device, layers spread over several GPUs, or streamed.
:func:`opened` gives baseline and evaluate their model (a streamed one runs generation and
teacher forcing layer-major through :mod:`abliterate.model.sweep`). A capture pass
(:func:`record_layer_calls`, :func:`run_layers`) runs layer-major over all its batches:

1. *record*: the model's own forward runs once per batch with every decoder layer replaced by a
   recorder that keeps the arguments the model passes to it (masks, rotary tables, position ids,
   per layer type: sliding and full attention, linear attention) and returns its input unchanged.
   This costs the embeddings only.
2. *stream*: for each layer in turn, its weights are read once (:meth:`Streamed.materialize`),
   the layer runs on the hidden states of every batch with that batch's recorded arguments, and
   its weights are dropped (:meth:`Streamed.release`).

Memory: one layer's weights plus the hidden states of the whole pass, ``[B, T, H]`` per batch in
the compute dtype (the demo, 326 prompts of about 60 tokens, hidden 576, float32: about 45 MB; a
70B-class model, 1,000 prompts of 100 tokens, hidden 8192, bfloat16: about 1.6 GB).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterator
from typing import Any, Callable

from abliterate.errors import fail

MODES = ("auto", "on", "off")
MARGIN = 1.25  # stream when the weights in the compute dtype times this exceed the free memory


@dataclass
class Streamed:
    """A model whose decoder layers live on disk until :meth:`materialize` brings one in."""

    model: Any
    layers: Any  # the model's ModuleList of decoder layers, parameters on the meta device
    sources: list[dict[str, Callable[[], Any]]]  # per layer: parameter name -> reads its tensor
    device: Any
    scratch: Path | None = None
    layer_bytes: list[int] = field(default_factory=list)

    def materialize(self, i: int) -> None:
        """Read layer ``i``'s weights onto the device, in the dtype the model was built with."""
        from accelerate.utils import set_module_tensor_to_device

        layer = self.layers[i]
        for name, read in self.sources[i].items():
            set_module_tensor_to_device(layer, name, self.device, value=read())

    def release(self, i: int) -> None:
        """Drop layer ``i``'s weights (back to the meta device)."""
        from accelerate.utils import set_module_tensor_to_device

        for name in self.sources[i]:
            set_module_tensor_to_device(self.layers[i], name, "meta")

    def close(self) -> None:
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None


def weights_bytes(model_dir: Path) -> int:
    """Bytes of the checkpoint's tensors (the sizes of its safetensors files)."""
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))


BUDGET_VARIABLE = "ABLITERATE_MEMORY_BUDGET"  # e.g. 16GB: the memory auto placement may count on, per device


def parse_size(text: str) -> int:
    """``"16GB"``, ``"512MB"``, ``"64kB"`` or a byte count -> bytes (powers of 1024)."""
    units = {"kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30, "tb": 1 << 40, "b": 1}
    clean = text.strip().lower()
    for unit, size in units.items():
        if clean.endswith(unit):
            try:
                return int(float(clean[: -len(unit)]) * size)
            except ValueError:
                break
    if clean.isdigit():
        return int(clean)
    fail(f"{BUDGET_VARIABLE}={text!r} is not a size; give bytes or a number with kB, MB, GB or TB")


def free_bytes(device: str) -> list[int]:
    """Memory free now on each device that ``device`` may use: every visible GPU for ``cuda``
    (one for ``cuda:N``), else the machine's available RAM; :data:`BUDGET_VARIABLE` caps each."""
    import os

    import torch

    budget = os.environ.get(BUDGET_VARIABLE, "").strip()
    cap = parse_size(budget) if budget else None
    if cap is not None and not device.startswith("cuda"):
        return [cap]
    if device.startswith("cuda"):
        indices = [int(device.split(":")[1])] if ":" in device else list(range(torch.cuda.device_count()))
        free = [int(torch.cuda.mem_get_info(torch.device("cuda", i))[0]) for i in indices]
        return free if cap is None else [min(f, cap) for f in free]
    import psutil

    return [int(psutil.virtual_memory().available)]


COMPUTE_DTYPES = ("auto", "checkpoint", "float32", "bfloat16", "float16")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def checkpoint_dtype(model_dir: Path) -> str:
    """The dtype the checkpoint's config names (float32 when it names none we compute in)."""
    from abliterate.model.modelio import read_config, text_config

    config = read_config(model_dir)
    name = str(config.get("torch_dtype") or config.get("dtype") or text_config(config).get("dtype") or "float32")
    return name if name in DTYPE_BYTES else "float32"


def resolve_dtype(name: str, device: str, model_dir: Path) -> str:
    """The compute dtype of a pass: ``auto`` is float32 on a CPU or MPS (bfloat16 matmuls are slow
    there, and float32 keeps rounding out of the means) and the checkpoint's own on a GPU (bf16 for
    most: half the memory); ``checkpoint`` is the checkpoint's own everywhere."""
    if name not in COMPUTE_DTYPES:
        fail(f"dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {name!r}")
    if name == "auto":
        return checkpoint_dtype(model_dir) if str(device).startswith("cuda") else "float32"
    return checkpoint_dtype(model_dir) if name == "checkpoint" else name


def compute_bytes(model_dir: Path, dtype: str) -> int:
    """The checkpoint's bytes once loaded in ``dtype`` (a resolved name: float32 doubles a 16-bit checkpoint).

    A quantized checkpoint (:func:`abliterate.quant.registry.method_of`) is counted from its shard
    headers instead (:func:`dequantized_elements`): transformers de-quantizes it into ``dtype``, so
    its stored size (0.5-1 byte a weight) would under-state the need 2-8 times. Where a GPU kernel
    keeps the weights quantized, this is an upper bound."""
    from abliterate.quant.registry import method_of

    width = DTYPE_BYTES.get(dtype, 4)
    if method_of(model_dir) is None:
        return weights_bytes(model_dir) * width // DTYPE_BYTES[checkpoint_dtype(model_dir)]
    from abliterate.formats.safetensors_io import read_header

    info = {name: t for path in sorted(Path(model_dir).glob("*.safetensors"))
            for name, t in read_header(path).tensors.items()}
    return dequantized_elements(info) * width


PACKED = ("F8_E4M3", "F8_E5M2", "U8")  # stored dtypes of quantized weights (FP8 codes; MXFP4 and NVFP4 nibbles)


def dequantized_elements(info: dict) -> int:
    """Elements of the model transformers builds from a quantized checkpoint (``info``: name ->
    TensorInfo over all shards). An FP8 ``weight`` holds one per byte; gpt-oss MXFP4 ``x_blocks``
    (beside ``x_scales``) and a ModelOpt NVFP4 ``weight`` (uint8 beside ``weight_scale``) two per
    byte. The scales of a quantized weight (``weight_scale_inv``, ``weight_scale``,
    ``weight_scale_2``, ``x_scales``) count nothing: de-quantizing folds them into the weight and
    the model keeps no copy. Every other tensor counts its own elements."""
    total = 0
    for name, t in info.items():
        if name.endswith("_scales") and name[: -len("_scales")] + "_blocks" in info:
            continue
        base = next((name[: -len(s)] for s in ("_scale_inv", "_scale_2", "_scale") if name.endswith(s)), None)
        if base is not None and base in info and info[base].dtype in PACKED:
            continue
        nibbles = t.dtype == "U8" and ((name.endswith("_blocks") and name[: -len("_blocks")] + "_scales" in info)
                                       or name + "_scale" in info)
        total += t.numel * (2 if nibbles else 1)
    return total


# Work inside a layer (per batch) always allowed, however small the layers: below it the batch size does not matter.
MIN_LAYER_WORK = 64 * 2**20


def layer_batch(config: dict, longest: int, width: int, layer_bytes: int, batch_size: int) -> int:
    """The batch size (at most ``batch_size``) whose work inside one decoder layer stays within half
    of ``layer_bytes`` (or :data:`MIN_LAYER_WORK`): streaming reads each layer once per pass whatever the batch, so smaller batches
    lower the peak at little cost. Per token and layer the work is about 3 MLP intermediates
    (gate, up, their product), 6 hidden-size vectors (residual, norm, q/k/v/o) and one attention row
    (``longest`` scores per head), each ``width`` bytes."""
    text = config.get("text_config") or config
    hidden = int(text.get("hidden_size", 0) or 0)
    experts = int(text.get("num_experts_per_tok", 0) or 0) + (1 if text.get("shared_expert_intermediate_size") else 0)
    intermediate = max(int(text.get("intermediate_size", 0) or 0),
                       int(text.get("moe_intermediate_size", 0) or 0) * max(experts, 1))
    heads = int(text.get("num_attention_heads", 1) or 1)
    per_prompt = longest * width * (3 * intermediate + 6 * hidden + heads * longest)
    return max(1, min(batch_size, max(layer_bytes // 2, MIN_LAYER_WORK) // max(per_prompt, 1)))


def placement(mode: str, need: int, free: list[int]) -> str:
    """Where a model of ``need`` bytes goes, given the free bytes of each usable device: ``one``
    (the first device), ``spread`` (layers placed over several GPUs) or ``stream`` (one layer at a
    time). ``on`` always streams; ``off`` never does; ``auto`` keeps a margin of :data:`MARGIN`."""
    if mode not in MODES:
        fail(f"streaming must be one of {', '.join(MODES)}, got {mode!r}")
    wanted = need * (MARGIN if mode == "auto" else 1.0)
    fits_one, fits_all = wanted <= free[0], len(free) > 1 and wanted <= sum(free)
    if mode == "on" or (mode == "auto" and not fits_one and not fits_all):
        return "stream"
    return "spread" if not fits_one and fits_all else "one"


def place(mode: str, model_dir: Path, dtype: str, device: str, free: list[int] | None = None) -> str:
    """:func:`placement` of the model in ``model_dir`` on ``device`` (``free`` replaces the measurement, for tests)."""
    if mode not in MODES:  # before measuring anything
        fail(f"streaming must be one of {', '.join(MODES)}, got {mode!r}")
    return placement(mode, compute_bytes(model_dir, dtype), free_bytes(device) if free is None else free)


def load_spread(model_dir: Path, dtype: str):
    """The model with its layers placed over every visible GPU by accelerate's device map (inputs go
    to the first); eval mode, no gradients."""
    from transformers import AutoModelForCausalLM

    from abliterate.model.modelio import check_model_dir, quiet_libraries, torch_dtype

    quiet_libraries()
    check_model_dir(model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch_dtype(dtype), device_map="auto")
    model.eval()
    model.requires_grad_(False)
    return model


@contextlib.contextmanager
def opened(model_dir: Path, dtype: str, device: str, mode: str, label: str, report=None,
           scratch_in: Path | None = None) -> Iterator[Any]:
    """The model for a stage's passes: loaded on one device, spread over the GPUs, or streamed
    (``model.abliterate_sweep`` set, so that :mod:`abliterate.model.generation` runs it layer-major;
    a progress task counts the layers read). Scratch files (in ``scratch_in``, see
    :func:`load_streamed`) are removed on the way out."""
    from abliterate.model.modelio import load_model
    from abliterate.model.sweep import install
    from abliterate.progress import PLAIN

    where = place(mode, Path(model_dir), dtype, device)
    if where != "stream":
        yield load_spread(model_dir, dtype) if where == "spread" else load_model(model_dir, dtype, device)
        return
    streamed = load_streamed(Path(model_dir), dtype=dtype, device=device, scratch_in=scratch_in)
    # what the batches' KV caches may hold at once: the memory free now, less a layer and its work
    budget = max(free_bytes(device)[0] - 2 * max(streamed.layer_bytes), 0)
    sweep = install(streamed, budget=budget)
    total = len(streamed.layers)
    try:
        with (report or PLAIN).task(f"{label}: layers read, streamed", unit="bytes") as task:
            def on_read(i: int, size: int) -> None:
                task.update(layer=f"layer {i + 1}/{total}" + (f", wave {sweep.waves}" if sweep.waves > 1 else ""))
                task.advance(size)

            sweep.on_read = on_read
            yield streamed.model
    finally:
        streamed.close()


def _layers_prefix(model, layers) -> str:
    for name, module in model.named_modules():
        if module is layers:
            return name
    fail(f"cannot find the decoder layers of {type(model).__name__} by name; streaming does not support it")


def _fixed_mmap_threshold() -> None:
    """Keep glibc returning freed layer weights to the system.

    glibc raises its mmap threshold each time a large block is freed (up to 32 MB), after which
    blocks that size come from the heap and stay in the process once freed: a streamed pass then
    grows by about a layer's worth of tensors below 32 MB (measured: peak RSS 2.1 GB instead of
    1.4 GB on bench/streaming.py's 4.2 GB model). A fixed threshold of 1 MB stops that; elsewhere
    (no glibc) nothing changes."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        ctypes.CDLL(name).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def load_streamed(model_dir: Path, dtype: str = "float32", device: str = "cpu", scratch_in: Path | None = None) -> Streamed:
    """Build the model with its decoder layers left on disk (see the module docstring).

    ``scratch_in``: where the scratch folder for tensors transformers converts at load time goes
    (default: the system's temporary folder); put it beside the output, on a disk with room."""
    import torch
    from accelerate import init_empty_weights
    from accelerate.hooks import remove_hook_from_module
    from transformers import AutoConfig, AutoModelForCausalLM

    from abliterate.model.modelio import check_model_dir, decoder_layers, quiet_libraries, torch_dtype

    quiet_libraries()
    check_model_dir(model_dir)
    _fixed_mmap_threshold()
    config = AutoConfig.from_pretrained(str(model_dir))
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    prefix = _layers_prefix(skeleton, decoder_layers(skeleton))
    count = len(decoder_layers(skeleton))
    device_map: dict[str, str] = {f"{prefix}.{i}": "disk" for i in range(count)}
    for name, _ in [*skeleton.named_parameters(), *skeleton.named_buffers()]:
        if not name.startswith(prefix + "."):
            device_map[name.rpartition(".")[0]] = str(device)
    del skeleton
    scratch = Path(tempfile.mkdtemp(prefix=".abliterate-stream-", dir=scratch_in))
    logging.getLogger("accelerate.big_modeling").setLevel(logging.ERROR)  # "parameters on the meta device": meant
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch_dtype(dtype), device_map=device_map,
                                                     offload_folder=str(scratch))
    except Exception:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    model.eval()
    model.requires_grad_(False)
    layers = decoder_layers(model)
    sources: list[dict[str, Callable[[], Any]]] = []
    sizes = []
    for layer in layers:
        found: dict[str, Callable[[], Any]] = {}
        for module_name, module in layer.named_modules():
            hook = getattr(module, "_hf_hook", None)
            weights = getattr(hook, "weights_map", None)
            if weights is None:
                continue
            for param_name, _ in module.named_parameters(recurse=False):
                key = f"{module_name}.{param_name}" if module_name else param_name
                found[key] = (lambda w=weights, n=param_name: w[n])
        remove_hook_from_module(layer, recurse=True)
        missing = [n for n, p in layer.named_parameters() if n not in found and p.device.type == "meta"]
        if missing:
            fail(f"{model_dir}: transformers left {missing[0]} of a decoder layer without a source; "
                 "streaming does not support this model: use --streaming off")
        sources.append(found)
        sizes.append(sum(p.numel() * p.element_size() for p in layer.parameters()))
    return Streamed(model, layers, sources, torch.device(device), scratch, sizes)


class _Stop(Exception):
    """Raised by the last layer's recorder: the rest of the model's forward is not needed."""


def record_layer_calls(streamed: Streamed, batches: list[dict]) -> tuple[list[Any], list[list[tuple]]]:
    """Run the model's forward on each batch's inputs (``input_ids``, ``attention_mask``, ...) with
    the decoder layers replaced by recorders.

    Returns the hidden states entering layer 0 per batch (``[B, T, H]``) and, per batch and layer,
    the ``(args, kwargs)`` the model passed to that layer besides the hidden states.
    """
    import torch

    layers = streamed.layers
    last = len(layers) - 1
    calls: list[list[tuple]] = []
    firsts: list[Any] = []

    def recorder(i: int):
        def forward(*args, **kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if i == 0:
                firsts.append(hidden)
            elif hidden.shape != firsts[-1].shape:
                fail(f"{type(streamed.model).__name__} does not pass hidden states from layer to layer as a "
                     "tensor; streaming does not support it: use --streaming off")
            calls[-1].append((tuple(args[1:]), dict(kwargs)))
            if i == last:
                raise _Stop
            return hidden
        return forward

    for i, layer in enumerate(layers):
        layer.forward = recorder(i)
    try:
        with torch.inference_mode():
            for inputs in batches:
                calls.append([])
                try:
                    streamed.model(**inputs, use_cache=False)
                except _Stop:
                    pass
                if len(calls[-1]) != len(layers):
                    fail(f"{type(streamed.model).__name__} did not run all {len(layers)} decoder layers; "
                         "streaming does not support it: use --streaming off")
    finally:
        for layer in layers:
            del layer.forward  # back to the class's forward
    return firsts, calls


def run_layers(streamed: Streamed, hidden: list[Any], calls: list[list[tuple]], on_layer=None) -> list[Any]:
    """Stream every decoder layer over all batches: ``hidden[b]`` goes in, the last layer's output
    comes out (per batch). ``on_layer(i, hidden)`` is called with the states entering layer ``i``
    (and ``i == L`` with the last layer's output); hooks on the layers fire as in a normal forward."""
    import torch

    states = list(hidden)
    with torch.inference_mode():
        for i, layer in enumerate(streamed.layers):
            if on_layer is not None:
                on_layer(i, states)
            streamed.materialize(i)
            try:
                for b in range(len(calls)):
                    args_i, kwargs_i = calls[b][i]
                    out = layer(states[b], *args_i, **kwargs_i)
                    states[b] = out[0] if isinstance(out, tuple) else out
            finally:
                streamed.release(i)
        if on_layer is not None:
            on_layer(len(streamed.layers), states)
    return states
