"""Replay the unchanged bottom of the model: a trial recomputes only the layers it edits and above.

A search trial edits decoder layers ``k >= j`` only (``j`` = its lowest edited layer), so on the
same inputs layers ``0 .. j-1`` compute exactly what they computed in the base model. The scorer
runs the same validation batches in every trial; :class:`Replay` records, once on the base model,
what each bottom layer returned for each batch and the keys/values it appended to the KV cache,
and in a trial swaps layers ``0 .. j-1`` for modules that hand back those records (and append the
recorded keys/values, so generation continues from a complete cache). The outputs are the very
tensors the layers returned, so a replayed forward pass is bit-identical to a computed one
(checked on the base model before use; any architecture where that check fails, or whose cache is
not a plain per-layer key/value cache, simply runs every layer).

Memory: about ``2 x tokens x (hidden + 2 x kv_width)`` floats per recorded layer over all
batches; layers are recorded bottom-up until :data:`BUDGET` bytes are used.
"""

from __future__ import annotations

import contextlib

BUDGET = 1 << 30  # bytes of recorded layer outputs


def _module_class():
    import torch

    from transformers.cache_utils import Cache

    class ReplayedLayer(torch.nn.Module):
        """Stands in for one decoder layer: returns its recorded output for the current batch."""

        def __init__(self, index: int, record: tuple, original):
            super().__init__()
            self.index, self.record = index, record
            for name in ("attention_type", "layer_idx", "is_sliding", "layer_type"):  # read by some decoders
                if hasattr(original, name):
                    setattr(self, name, getattr(original, name))

        def forward(self, hidden_states, *args, **kwargs):
            output, keys, values = self.record
            cache = next((v for v in (*args, *kwargs.values()) if isinstance(v, Cache)), None)
            if cache is not None:
                cache.update(keys, values, self.index)
            return _clone(output)  # the next layer may work in place on its input

    return ReplayedLayer


class Replay:
    """Records of the bottom decoder layers per batch key; swaps them in while a trial runs."""

    def __init__(self, model, batches: int):
        from abliterate.model.modelio import decoder_layers

        self.model, self.layers = model, decoder_layers(model)
        self.batches = max(1, batches)  # batches that will be recorded (for the memory estimate)
        self.depth: int | None = None  # layers recorded (decided on the first batch)
        self.records: dict = {}
        self.enabled = True
        self._class = None

    def capture(self, key, prefix_len: int, run):
        """Run ``run()`` (a forward pass that returns its KV cache) and keep the bottom layers' work."""
        from transformers.cache_utils import DynamicLayer

        outputs: dict[int, object] = {}
        hooks = [layer.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out))
                 for i, layer in enumerate(self.layers)]
        try:
            result = run()
        finally:
            for hook in hooks:
                hook.remove()
        cache = result[-1]
        cache_layers = getattr(cache, "layers", None)
        if not self.enabled or cache_layers is None or len(cache_layers) < len(self.layers):
            self.enabled = False
            return result
        if self.depth is None:
            self.depth, used = 0, 0
            for i in range(len(self.layers)):
                if type(cache_layers[i]) is not DynamicLayer or i not in outputs:
                    break
                used += self.batches * (_nbytes(outputs[i]) + 2 * cache_layers[i].keys[:, :, prefix_len:].nbytes)
                if used > BUDGET:
                    break
                self.depth = i + 1
        self.records[key] = [(outputs[i], cache_layers[i].keys[:, :, prefix_len:].clone(),
                              cache_layers[i].values[:, :, prefix_len:].clone()) for i in range(self.depth)]
        return result

    @contextlib.contextmanager
    def active(self, key, unchanged: int):
        """Within the block, layers ``0 .. min(unchanged, depth) - 1`` replay their records for ``key``."""
        count = min(unchanged, self.depth or 0) if self.enabled and key in self.records else 0
        if count == 0:
            yield
            return
        if self._class is None:
            self._class = _module_class()
        saved = [self.layers[i] for i in range(count)]
        try:
            for i in range(count):
                self.layers[i] = self._class(i, self.records[key][i], saved[i])
            yield
        finally:
            for i in range(count):
                self.layers[i] = saved[i]


def _clone(output):
    if isinstance(output, (tuple, list)):
        return type(output)(_clone(x) for x in output)
    return output.clone() if hasattr(output, "clone") else output


def _nbytes(output) -> int:
    if isinstance(output, (tuple, list)):
        return sum(_nbytes(x) for x in output)
    return int(getattr(output, "nbytes", 0) or 0)
