"""Edit a loaded model's weights in place with the ablation engine's own code, and undo the edits.

The search stage tries many ablations on one loaded model. Each trial's edits come from
``abliterate.edits.build_edits`` (as in ``plan``) and every edited tensor is recomputed by the very
producer ``ablate`` uses (:func:`abliterate.shard_edit.producer`: same chunks, same fp32 math, same rounding
to the stored dtype), reading the base shard on disk. The rows it writes are encoded to the
checkpoint's dtype and then cast to the loaded parameter's dtype, exactly what loading the ablated
shard would give: a trial's model equals the model ``dvc repro`` writes for the same plan, bit for
bit after that cast.

Only targeted tensors are touched: before a tensor is first edited, a copy of its loaded values is
kept, and a tensor the next trial leaves alone is restored from that copy (:meth:`restore` undoes
everything). Names are read from the safetensors files; a name the loaded model also has (with
the same shape) is that parameter. transformers 5 fuses per-expert MoE weights into one 3-D
parameter in memory (``experts.{e}.down_proj.weight`` on disk, ``experts.down_proj[e]`` loaded), so
a per-expert tensor is mapped onto the slice of a parameter of the same layer that holds exactly
its values; a tensor that maps nowhere stops the search with a one-line error.

A target stored quantized (FP8, MXFP4, NVFP4; :mod:`abliterate.quant`) is loaded de-quantized into
the parameter of its logical name (transformers does so on a CPU); a trial writes there what
loading ablate's output gives: ablate's own rewrite of each piece (de-quantize, edit, quantize back
with fresh scales and direction-aware rounding, :func:`abliterate.quant.rewrite.edit_piece`),
de-quantized again, cast to the parameter's dtype.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from abliterate.records import Edit
from abliterate.errors import fail


@dataclass
class Target:
    info: object  # safetensors_io.TensorInfo of the base shard
    fd: int  # the base shard, opened for reading
    param: object  # the loaded parameter (torch)
    index: int | None  # expert slice of a fused parameter, or None for the whole parameter
    original: object  # a copy of the loaded values (torch, the parameter's dtype and device)
    buffer: object  # numpy array of the stored dtype, reused for the produced bytes

    def view(self):
        return self.param.data if self.index is None else self.param.data[self.index]


class LiveEditor:
    """Applies edit lists (from :func:`abliterate.edits.build_edits`) to ``model`` in place; restores the originals."""

    def __init__(self, model, model_dir: str | Path, names: dict[str, str], threads: int = 1):
        self.model_dir = Path(model_dir)
        self.names = names  # tensor -> shard file
        self.params = dict(model.named_parameters())
        self.threads = max(1, int(threads))
        self.headers: dict[str, object] = {}
        self.fds: dict[str, int] = {}
        self.targets: dict[str, Target] = {}
        self.quantized: dict[str, tuple] = {}  # stored-quantized target -> (its loaded view, a copy of its values)
        self.edited: set[str] = set()

    # --- mapping ----------------------------------------------------------------------------

    def _header(self, file: str):
        from abliterate.formats.safetensors_io import read_header

        if file not in self.headers:
            self.headers[file] = read_header(self.model_dir / file)
            self.fds[file] = os.open(self.model_dir / file, os.O_RDONLY)
        return self.headers[file]

    def target(self, name: str) -> Target:
        """The loaded parameter (or expert slice) that holds on-disk tensor ``name``."""
        if name in self.targets:
            return self.targets[name]
        import numpy as np

        from abliterate.formats.safetensors_io import FLOAT_DTYPES

        file = self.names[name]
        info = self._header(file).tensors[name]
        param, index = self._locate(name, tuple(info.shape), lambda: self._stored(info, file))
        view = param.data if index is None else param.data[index]
        buffer = np.empty(info.numel, dtype=FLOAT_DTYPES[info.dtype][0])
        self.targets[name] = Target(info, self.fds[file], param, index, view.detach().clone(), buffer)
        return self.targets[name]

    def _locate(self, name: str, shape: tuple[int, ...], stored):
        """``(parameter, expert index or None)`` holding tensor ``name`` of ``shape``; ``stored()``: its values."""
        param = self.params.get(name)
        if param is not None and tuple(param.shape) == shape:
            return param, None
        expert = re.search(r"\.experts\.(\d+)\.", name)
        layer = re.search(r"(^|\.)layers\.(\d+)\.", name)
        if expert and layer:
            e, head = int(expert.group(1)), f"layers.{layer.group(2)}."
            values = None
            for pname, candidate in self.params.items():
                if (head not in pname or candidate.dim() != len(shape) + 1 or candidate.shape[0] <= e
                        or tuple(candidate.shape[1:]) != shape):
                    continue
                if values is None:
                    values = stored().to(candidate.dtype)
                if bool((candidate.data[e].cpu() == values).all()):
                    return candidate, e
        fail(f"tensor {name} of {self.model_dir} maps onto no parameter of the loaded model (transformers may store "
             "it differently in memory); the search supports dense models and fused-on-disk layouts for this "
             "architecture: run without search (ablate.layers auto or a layer list)")

    def _stored(self, info, file: str):
        """The tensor's stored values, decoded, as a CPU torch tensor of its storage dtype's compute type."""
        import torch

        from abliterate.formats.safetensors_io import as_rows, read_rows

        rows, _ = as_rows(info)
        return torch.from_numpy(read_rows(self.fds[file], info, 0, rows)).reshape(info.shape)

    # --- editing ----------------------------------------------------------------------------

    def apply(self, edits: list[Edit]) -> None:
        """Make the model equal the base model with exactly ``edits`` applied (``build_edits`` order)."""
        grouped: dict[str, list[Edit]] = {}
        for edit in edits:
            grouped.setdefault(edit.tensor, []).append(edit)
        for name in sorted(self.edited - set(grouped)):
            self._restore(name)
        quantized = {name: group for name, group in grouped.items() if group[0].storage is not None}
        for name, group in sorted(quantized.items()):
            self._apply_quantized(name, group)
        jobs = [(self.target(name), group) for name, group in grouped.items() if name not in quantized]
        if self.threads > 1 and len(jobs) > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=self.threads) as pool:
                list(pool.map(lambda job: self._produce(*job), jobs))
        else:
            for job in jobs:
                self._produce(*job)
        for target, _ in jobs:
            self._store(target)
        self.edited = set(grouped)

    def _produce(self, target: Target, group: list[Edit]) -> None:
        """Run ablate's producer for one tensor; its encoded rows land in ``target.buffer``."""
        from abliterate.formats.safetensors_io import as_rows, encode
        from abliterate.shard_edit import producer

        info = target.info
        if len({e.layout for e in group}) != 1 or group[0].dtype != info.dtype:
            fail(f"the edits of {info.name} do not fit the checkpoint; rerun the search")
        _, cols = as_rows(info)

        def write(chunk, first_row: int, finite: bool = False) -> None:
            data = encode(chunk, info.dtype).reshape(-1)
            target.buffer[first_row * cols : first_row * cols + data.size] = data

        producer(group)(target.fd, info, write)

    @staticmethod
    def _store(target: Target) -> None:
        """Cast the produced stored-dtype values to the parameter's dtype, as loading would."""
        import torch

        info = target.info
        if info.dtype == "BF16":  # stored as raw uint16 bits
            raw = torch.from_numpy(target.buffer.view("int16")).view(torch.bfloat16)
        else:
            raw = torch.from_numpy(target.buffer)
        target.view().copy_(raw.reshape(info.shape))

    def _apply_quantized(self, name: str, group: list[Edit]) -> None:
        """Write into the de-quantized parameter ``name`` what loading ablate's rewrite of it gives."""
        import numpy as np
        import torch

        from abliterate.quant import stored
        from abliterate.quant.expand import main_name
        from abliterate.quant.rewrite import edit_piece

        record = group[0].storage
        file = self.names[main_name(record)]
        tensors = self._header(file).tensors
        fd = self.fds[file]

        def base_values():  # de-quantized as loading does: [E, in, out] for MXFP4 experts, else one piece
            loaded = [stored.load(fd, record, tensors, piece)[0] for piece in stored.pieces(record, tensors)]
            return torch.from_numpy(np.stack(loaded) if record["format"] == "mxfp4" else loaded[0])

        if name not in self.quantized:
            param, index = self._locate(name, tuple(group[0].shape), base_values)  # a fused expert: its slice
            if param.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):  # e.g. float8
                fail(f"tensor {name} is stored quantized ({record['format']}) and the loaded model keeps it quantized "
                     "(a kernel on this device); run the search on a CPU, or without it (ablate.layers auto)")
            view = param.data if index is None else param.data[index]
            self.quantized[name] = (view, view.detach().clone())
        pieces = [stored.dequantize(record, edit_piece(fd, record, tensors, piece, group))
                  for piece in stored.pieces(record, tensors)]
        values = np.stack(pieces) if record["format"] == "mxfp4" else pieces[0]
        view = self.quantized[name][0]
        view.copy_(torch.from_numpy(np.ascontiguousarray(values)).reshape(view.shape).to(view.dtype))

    def _restore(self, name: str) -> None:
        if name in self.quantized:
            view, original = self.quantized[name]
            view.copy_(original)
            return
        target = self.targets[name]
        target.view().copy_(target.original)

    def restore(self) -> None:
        """Undo every edit: each touched tensor gets its loaded values back, bit for bit."""
        for name in sorted(self.edited):
            self._restore(name)
        self.edited = set()

    def close(self) -> None:
        self.restore()
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
