"""Stage ``baseline``: the base model's greedy answers and log-probabilities on the held-out eval prompts.

``artifacts/baseline.parquet`` holds one row per eval prompt, harmful prompts first:

  ``set`` (harmful | harmless), ``index`` (position in its file), ``text``, ``prompt_ids`` (the
  rendered chat-template tokens), ``answer_ids`` (the greedy answer, with the EOS that ended it),
  ``answer`` (decoded text), ``stop`` (eos | length | early), ``refused``; and, on harmless rows
  only (null on harmful ones), what KL needs:

  * ``first_logprobs``: the full next-token distribution at the first answer position, fp32
    log-probabilities over the whole vocabulary (exact first-token KL; 4 bytes x vocab per prompt,
    e.g. 0.6 MB for a 150k vocabulary);
  * ``kl_ids`` / ``kl_logprobs`` / ``kl_tail``: along the base answer's first ``kl-tokens`` tokens
    (teacher-forced), the top-k token ids and fp32 log-probabilities per position, and the fp64 log
    of the remaining mass. Storing full distributions for every position would be ``kl-tokens`` times
    bigger; the (k+1)-category KL these allow is a lower bound of the full KL (merging categories
    never raises a KL). With the default k = 256 it recovered 95% of the full per-token KL on
    SmolLM2-135M with perturbed weights (k = 64: 88%, k = 8: 67%), at about 2 kB per position.

Harmful answers stop early once they are decided refusals (``refusal.refusal_decided``): the verdict
cannot change and the rest is not needed. File metadata (key ``abliterate``, JSON) records the
generation settings, template and prompt hashes, stop ids and vocabulary size, so ``evaluate`` needs
no other parameter and never renders a prompt itself. The file is byte-deterministic.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from stages.cliutil import console, fail, new_app, run_app

META_KEY = b"abliterate"
FORMAT = 1
SETS = ("harmful", "harmless")

app = new_app(__doc__.splitlines()[0])


def refusal_stop(tokenizer, rows: set[int]):
    """A ``stop_early`` test: rows in ``rows`` stop once their partial answer is a decided refusal."""
    from stages.refusal import refusal_decided

    return lambda row, ids: row in rows and refusal_decided(tokenizer.decode(ids, skip_special_tokens=True))


def check_settings(max_new_tokens: int, kl_tokens: int, batch_size: int, top_k: int) -> None:
    if not 1 <= max_new_tokens <= 8192:
        fail(f"max-new-tokens must be between 1 and 8192, got {max_new_tokens}; set evaluate.max-new-tokens")
    if not 1 <= kl_tokens <= max_new_tokens:
        fail(f"kl-tokens must be between 1 and max-new-tokens ({max_new_tokens}), got {kl_tokens}; "
             "set evaluate.kl-tokens")
    if batch_size < 1:
        fail(f"batch-size must be at least 1, got {batch_size}; set evaluate.batch-size")
    if top_k < 1:
        fail(f"top-k must be at least 1, got {top_k}")


def build_baseline(model_dir: str | Path, harmful: str, harmless: str, out: str | Path, *, max_new_tokens: int,
                   kl_tokens: int, batch_size: int, dtype: str = "float32", device: str = "auto",
                   system_prompt: str = "", chat_template: str = "", top_k: int = 256) -> dict:
    """Generate the base model's answers, compute the KL references, write ``out``; return the metadata."""
    from stages.atomic import atomic_path
    from stages.generation import answer_logprobs, answer_text, greedy_generate, progress, stop_ids, top_k_summary
    from stages.modelio import check_model_dir, load_model, load_tokenizer, pick_device
    from stages.prompts import load_prompts, prompts_hash, render, resolve_template, template_hash
    from stages.refusal import is_refusal

    check_settings(max_new_tokens, kl_tokens, batch_size, top_k)
    texts = {"harmful": load_prompts(harmful), "harmless": load_prompts(harmless)}
    check_model_dir(model_dir)
    tokenizer = load_tokenizer(model_dir)
    template = resolve_template(tokenizer, chat_template)
    sets = [s for s in SETS for _ in texts[s]]
    index = [i for s in SETS for i in range(len(texts[s]))]
    prompt_ids = [ids for s in SETS for ids in render(tokenizer, texts[s], system_prompt, chat_template)]
    log = console()
    device = pick_device(device)
    model = load_model(model_dir, dtype, device)
    eos, pad_id = stop_ids(model, tokenizer), int(tokenizer.pad_token_id)
    start = time.perf_counter()
    with progress("baseline: base model answers", len(prompt_ids)) as advance:
        answers = greedy_generate(model, prompt_ids, max_new_tokens=max_new_tokens, eos_ids=eos, pad_id=pad_id,
                                  batch_size=batch_size, device=device, advance=advance,
                                  stop_early=refusal_stop(tokenizer, {i for i, s in enumerate(sets) if s == "harmful"}))
    texts_out = [answer_text(tokenizer, a) for a in answers]
    refused = [is_refusal(t) for t in texts_out]

    harmless_rows = [i for i, s in enumerate(sets) if s == "harmless"]
    first: dict[int, object] = {}  # row -> [vocab] fp32 numpy array
    along: dict[int, tuple] = {}
    with progress("baseline: log-probabilities", len(harmless_rows)) as advance:
        for k, logprobs in answer_logprobs(model, [prompt_ids[i] for i in harmless_rows],
                                           [answers[i].ids for i in harmless_rows], n_tokens=kl_tokens,
                                           pad_id=pad_id, batch_size=batch_size, device=device):
            row = harmless_rows[k]
            first[row] = logprobs[0].numpy()
            ids, values, tail = top_k_summary(logprobs, top_k)
            along[row] = (ids.tolist(), values.tolist(), tail.tolist())
            advance(1)
    vocab = int(next(iter(first.values())).shape[0])
    meta = {
        "kind": "baseline", "format": FORMAT, "model": str(model_dir), "model_type": model.config.model_type,
        "vocab_size": vocab, "max_new_tokens": max_new_tokens, "kl_tokens": kl_tokens, "top_k": min(top_k, vocab),
        "dtype": dtype, "system_prompt": system_prompt, "chat_template": chat_template,
        "template_sha256": template_hash(template), "eos_ids": eos, "pad_id": pad_id,
        "prompts": {s: {"file": str(f), "count": len(texts[s]), "sha256": prompts_hash(texts[s])}
                    for s, f in zip(SETS, (harmful, harmless))},
    }
    table = _table(sets, index, [t for s in SETS for t in texts[s]], prompt_ids, answers, texts_out, refused,
                   first, along, meta)
    import pyarrow.parquet as pq

    with atomic_path(out) as tmp:
        pq.write_table(table, tmp, compression="zstd", row_group_size=max(1, len(sets)))
    _log_summary(log, sets, answers, texts_out, refused, time.perf_counter() - start, out)
    return meta


def _table(sets, index, texts, prompt_ids, answers, answer_texts, refused, first, along, meta):
    import pyarrow as pa

    rows = range(len(sets))
    schema = pa.schema([
        ("set", pa.string()), ("index", pa.int32()), ("text", pa.string()),
        ("prompt_ids", pa.list_(pa.int32())), ("answer_ids", pa.list_(pa.int32())), ("answer", pa.string()),
        ("stop", pa.string()), ("refused", pa.bool_()), ("first_logprobs", pa.list_(pa.float32())),
        ("kl_ids", pa.list_(pa.list_(pa.int32()))), ("kl_logprobs", pa.list_(pa.list_(pa.float32()))),
        ("kl_tail", pa.list_(pa.float64())),
    ], metadata={META_KEY: json.dumps(meta, sort_keys=True).encode("utf-8")})
    return pa.table({
        "set": sets, "index": index, "text": texts, "prompt_ids": prompt_ids,
        "answer_ids": [a.ids for a in answers], "answer": answer_texts, "stop": [a.stop for a in answers],
        "refused": refused, "first_logprobs": _list_column(first, len(sets)),
        "kl_ids": [along[i][0] if i in along else None for i in rows],
        "kl_logprobs": [along[i][1] if i in along else None for i in rows],
        "kl_tail": [along[i][2] if i in along else None for i in rows],
    }, schema=schema)


def _list_column(values: dict, n: int):
    """A ``list<float32>`` column built from numpy rows (null where a row has none), without Python floats."""
    import numpy as np
    import pyarrow as pa

    offsets, chunks = [0], []
    for i in range(n):
        if i in values:
            chunks.append(np.asarray(values[i], dtype=np.float32))
        offsets.append(offsets[-1] + (len(chunks[-1]) if i in values else 0))
    flat = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat),
                                    mask=pa.array([i not in values for i in range(n)]))


def _numpy_rows(column) -> list:
    """A ``list<float32>`` column as numpy arrays (None for null rows)."""
    array = column.combine_chunks()
    offsets = array.offsets.to_numpy()
    flat = array.values.to_numpy(zero_copy_only=False).copy()  # writable, so torch can wrap it
    valid = array.is_valid().to_numpy(zero_copy_only=False)
    return [flat[offsets[i]:offsets[i + 1]] if valid[i] else None for i in range(len(array))]


def read_baseline(path: str | Path) -> tuple[dict, dict]:
    """(columns as Python lists, metadata) of a baseline file; a clear error if it is not one.

    ``first_logprobs`` comes back as numpy arrays (a vocabulary of floats per row)."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        fail(f"baseline file {path} does not exist; run `dvc repro baseline` (or `abliterate baseline ...`) first")
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        fail(f"baseline file {path} is not readable parquet ({type(exc).__name__}); rerun `dvc repro baseline`")
    raw = (table.schema.metadata or {}).get(META_KEY)
    meta = json.loads(raw) if raw else {}
    if meta.get("kind") != "baseline" or meta.get("format") != FORMAT:
        fail(f"{path} is not a baseline file of this version (no '{META_KEY.decode()}' metadata of format "
             f"{FORMAT}); rerun `dvc repro baseline`")
    columns = table.drop_columns(["first_logprobs"]).to_pydict()
    columns["first_logprobs"] = _numpy_rows(table.column("first_logprobs"))
    return columns, meta


def _log_summary(log, sets, answers, texts, refused, seconds, out) -> None:
    from rich.table import Table

    table = Table(title=f"baseline: {out}", title_justify="left")
    for column in ("set", "prompts", "refused", "empty answers", "mean tokens"):
        table.add_column(column, justify="left" if column == "set" else "right")
    for name in SETS:
        rows = [i for i, s in enumerate(sets) if s == name]
        empty = sum(1 for i in rows if not texts[i].strip())
        mean = sum(len(answers[i].ids) for i in rows) / max(1, len(rows))
        table.add_row(name, str(len(rows)), str(sum(refused[i] for i in rows)), str(empty), f"{mean:.1f}")
    log.print(table)
    empty = sum(1 for t in texts if not t.strip())
    if empty:
        log.print(f"[yellow]warning:[/] the base model generated nothing for {empty} of {len(texts)} prompts "
                  "(counted as refusals)")
    log.print(f"baseline: {len(sets)} prompts in {seconds:.1f} s")


@app.command()
def main(
    model: Path = typer.Option(..., help="Base model folder (Hugging Face layout)."),
    harmful: str = typer.Option(..., help="Held-out harmful prompts (refusal rate)."),
    harmless: str = typer.Option(..., help="Held-out harmless prompts (over-refusal rate and KL)."),
    out: Path = typer.Option(..., help="Output parquet file."),
    max_new_tokens: int = typer.Option(48, help="Greedy tokens generated per prompt."),
    kl_tokens: int = typer.Option(16, help="Answer tokens along which the KL reference is stored."),
    batch_size: int = typer.Option(16, help="Prompts per batch."),
    dtype: str = typer.Option("float32", help="float32, bfloat16, float16 or auto."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1, mps."),
    system_prompt: str = typer.Option("", help="System prompt rendered before every prompt."),
    chat_template: str = typer.Option("", help="Jinja chat template file for models without one."),
    top_k: int = typer.Option(256, help="Tokens kept per answer position for the answer KL (a lower bound)."),
) -> None:
    """The base model's greedy answers and log-probabilities on the held-out eval prompts."""
    build_baseline(model, harmful, harmless, out, max_new_tokens=max_new_tokens, kl_tokens=kl_tokens,
                   batch_size=batch_size, dtype=dtype, device=device, system_prompt=system_prompt,
                   chat_template=chat_template, top_k=top_k)


if __name__ == "__main__":
    run_app(app)
