"""The search's study: the loaded model, the Optuna study and its journal, trials, confirmation.

Used by ``stages.search`` (the stage) and ``bench/search.py``. One :class:`Study` loads the base
model once, remembers the base model's first-token distributions and refusals, and then, per
trial, builds the edits with ``abliterate.edits.build_edits`` (what ``plan`` runs), applies them with
``abliterate.model.live_edit.LiveEditor`` (what ``ablate`` computes), and scores them with
``abliterate.model.validation.Scorer``.

The first trial is always the default ablation (``layers: auto`` with the pipeline's measurement
and scale, as a point of the space: :func:`abliterate.search_space.start_point`), so the search
knows what it has to beat; with ``kl_budget`` None (``search.kl-budget: auto``) its KL is the
budget: the chosen trial then refuses least among the trials that damage no more than the default.

A trial whose KL exceeds the budget cannot be chosen whatever it refuses, so its harmful prompts
are not answered (answering is about three quarters of a trial's cost): it is told to the sampler as
refusing every prompt, marked infeasible, and recorded with ``refusals_proxy: null`` (left out of
the Pareto front, which therefore spans the budget).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from abliterate.errors import fail
from abliterate.records import AblationOptions
from abliterate.progress import PLAIN, Reporter


class Study:
    def __init__(self, model_dir: Path, directions: Path, harmful: str, harmless: str, *, seed: int,
                 borderline: str | None = None,
                 kl_budget: float | None, default: dict, validation: int, confirm_prompts: int,
                 proxy_tokens: int, startup_trials: int, batch_size: int, dtype: str, device: str, threads: int,
                 options: AblationOptions, system_prompt: str, chat_template: str, journal_dir: str,
                 max_prompt_tokens: int = 4096,
                 report: Reporter = PLAIN):
        import torch

        from abliterate.model.live_edit import LiveEditor
        from abliterate.model.modelio import check_model_dir, load_model, load_tokenizer, pick_device, read_config, text_config
        from abliterate.model.modelio import weight_map
        from abliterate.formats.directions import check_indices, load_directions
        from abliterate.hashing import sha256_file
        from abliterate.model.prompt_limits import render_checked, token_limit
        from abliterate.model.prompts import resolve_template, template_hash
        from abliterate.search_space import VERSION, component_roles
        from abliterate.targets import match_tensors
        from abliterate.model.validation import Scorer, split_validation

        torch.set_num_threads(threads)
        self.log = report
        self.model_dir, self.options, self.sparsity = Path(model_dir), options, float(options.sparsity)
        self.fixed_budget = None if kl_budget is None else float(kl_budget)
        self.proxy_tokens, self.seed = proxy_tokens, seed
        check_model_dir(model_dir)
        self.config = text_config(read_config(model_dir))
        self.num_layers = int(self.config.get("num_hidden_layers", 0))
        self.names = weight_map(model_dir)
        self.tensors, _ = load_directions(directions)
        check_indices(self.tensors, self.num_layers, directions, model_dir)
        self.start = None  # the default ablation as a point of the space (needs the layer scores)
        if default.get("scores") is not None:
            from abliterate.layers import PER_LAYER, default_layers, parse_index
            from abliterate.search_space import start_point

            layers, best = default_layers(default["scores"], self.tensors, default["auto_fraction"], self.num_layers)
            m = parse_index(default["measurement"], self.num_layers + 1, "ablate.measurement", per_layer=True)
            self.start = start_point(layers, best if m in (None, PER_LAYER) else m, default["scale"], self.num_layers,
                                     scope="per-layer" if m == PER_LAYER else "global")
        _, _, matches, _ = match_tensors(self.names, self.config)
        self.roles = component_roles(options.targets)
        self.layers_with = {c: {m.layer for m in matches if m.layer is not None and m.rule.role in roles}
                            for c, roles in self.roles.items()}
        self.sets = split_validation(harmful, harmless, validation, confirm_prompts, borderline)
        tokenizer = load_tokenizer(model_dir)
        template = resolve_template(tokenizer, chat_template)
        # every prompt within the context and capture.max-prompt-tokens, before the model is loaded
        limit = token_limit(read_config(model_dir), max_prompt_tokens)
        harmful_ids = render_checked(tokenizer, self.sets.harmful, str(harmful), limit, system_prompt, chat_template)
        harmless_ids = render_checked(tokenizer, self.sets.harmless, str(harmless), limit, system_prompt,
                                      chat_template)
        confirm_ids = render_checked(tokenizer, self.sets.confirm, str(harmful), limit, system_prompt, chat_template)
        borderline_ids = render_checked(tokenizer, self.sets.borderline, str(borderline), limit, system_prompt,
                                        chat_template) if self.sets.borderline else []
        device = pick_device(device)
        from abliterate.model.streaming import resolve_dtype

        dtype = resolve_dtype(dtype, device, Path(model_dir))
        _check_fits(Path(model_dir), dtype, device)
        model = load_model(model_dir, dtype, device)
        self.scorer = Scorer(model, tokenizer, harmful_ids, harmless_ids, batch_size=batch_size, device=device,
                             confirm_ids=confirm_ids, borderline_ids=borderline_ids)
        base_hash = self.scorer.remember_base()
        self.base_proxy = sum(self.scorer.refusals(proxy_tokens))
        self.base_confirmed: int | None = None
        self.base_over: int | None = None  # borderline validation prompts the base model refuses
        self.over: dict[int, int] = {}  # trial -> borderline validation prompts it refuses (confirmed trials)
        self.directions_sha = sha256_file(directions)
        inputs = {"space": VERSION, "directions": self.directions_sha, "config": self.config, "base": base_hash,
                  "harmful": harmful_ids, "harmless": harmless_ids, "template": template_hash(template),
                  "seed": seed, "startup": startup_trials, "proxy_tokens": proxy_tokens,
                  "kl_budget": "auto" if kl_budget is None else kl_budget, "start": self.start,
                  "options": {k: v for k, v in options.to_json().items() if k != "sparsity"}, "sparsity": self.sparsity, "dtype": dtype, "device": str(device), "threads": threads}
        self.key = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()
        self.editor = LiveEditor(model, model_dir, self.names, threads)
        self.study = self._study(journal_dir, seed, startup_trials)

    def _study(self, journal_dir: str, seed: int, startup_trials: int):
        import warnings

        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        storage = None
        if journal_dir:
            from optuna.storages import JournalStorage
            from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

            path = Path(journal_dir) / f"{self.key[:24]}.journal"
            path.parent.mkdir(parents=True, exist_ok=True)
            storage = JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
        sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=startup_trials)
        return optuna.create_study(study_name=f"search-{self.key[:24]}", storage=storage, sampler=sampler,
                                   directions=["minimize", "minimize"], load_if_exists=True)

    # --- trials --------------------------------------------------------------------------------

    def layer_edits(self, params: dict) -> list:
        from abliterate.search_space import kernel

        return kernel(params, self.num_layers, self.sparsity, self.roles, self.layers_with)

    def apply(self, params: dict) -> None:
        """Make the loaded model the base model ablated with ``params`` (restoring the rest)."""
        from abliterate.edits import build_edits
        from abliterate.records import LayerEdit

        default = LayerEdit(-1, params["measurement"], 1.0, self.sparsity)
        edits, _ = build_edits(self.model_dir, self.names, self.config, self.tensors, self.layer_edits(params),
                               self.options, default=default)
        self.editor.apply(edits)
        # the layers below the lowest edited one compute what the base model computed (abliterate.model.replay)
        self.scorer.unchanged = min((-1 if e.layer is None else e.layer for e in edits), default=self.num_layers)
        self.scorer.unchanged = max(self.scorer.unchanged, 0)

    def start_trial(self, trials: list):
        """The completed trial that is the default ablation (None: not run yet, or no start point)."""
        return next((t for t in trials if t.user_attrs.get("start")), None)

    def budget(self, trials: list | None = None) -> float:
        """The KL budget: the fixed one, or the default ablation's KL (infinite until it has run)."""
        if self.fixed_budget is not None:
            return self.fixed_budget
        start = self.start_trial(self.completed() if trials is None else trials)
        return float("inf") if start is None else float(start.values[1])

    def score(self, params: dict) -> tuple[int | None, float]:
        """(proxy refusals, first-token KL) of one point of the space; refusals None if not measured."""
        self.apply(params)
        kl = self.scorer.kl()
        if kl > self.budget():
            return None, kl
        return sum(self.scorer.refusals(self.proxy_tokens)), kl

    def completed(self, limit: int | None = None) -> list:
        from optuna.trial import TrialState

        done = sorted(self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number)
        return done if limit is None else done[:limit]

    def best(self, trials: list) -> tuple | None:
        inside = [t for t in trials if t.values[1] <= self.budget(trials)]
        return min(((t.values[0], t.values[1], t.number) for t in inside), default=None)

    def optimize(self, trials: int) -> bool:
        """Run trials until ``trials`` are complete; True if Ctrl-C stopped it."""
        from optuna.trial import TrialState

        from abliterate.search_space import suggest

        done = len(self.completed())
        n = len(self.sets.harmful)
        if done:
            self.log.message(f"search: continuing a study of {done} trials ({self.key[:12]})")
        self._enqueue_start()
        best = self.best(self.completed())
        with self.log.task("search", total=trials, best=self._best_text(best, n)) as task:
            task.advance(min(done, trials))
            for _ in range(max(0, trials - done)):
                trial = None
                try:
                    trial = self.study.ask()
                    refusals, kl = self.score(suggest(trial, self.num_layers))
                    budget = kl if trial.user_attrs.get("start") and self.fixed_budget is None else self.budget()
                    trial.set_constraint("kl_budget", kl - budget)  # feasible: <= 0
                    trial.set_user_attr("answered", refusals is not None)
                    self.study.tell(trial, [n if refusals is None else refusals, kl])
                except KeyboardInterrupt:
                    if trial is not None and trial.number not in {t.number for t in self.completed()}:
                        self.study.tell(trial, state=TrialState.FAIL)
                    self.log.message("search: interrupted; keeping the best trial so far")
                    return True
                if refusals is not None and kl <= self.budget() and (best is None or (refusals, kl, trial.number)
                                                                        < best):
                    best = (refusals, kl, trial.number)
                    task.update(best=self._best_text(best, n))
                task.advance(1)
        return False

    def _enqueue_start(self) -> None:
        """Queue the default ablation as the next trial unless it ran or waits already."""
        from optuna.trial import TrialState

        if self.start is None or self.start_trial(self.completed()) is not None:
            return
        if any(t.user_attrs.get("start") for t in self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,))):
            return
        self.study.enqueue_trial(self.start, user_attrs={"start": True})

    @staticmethod
    def _best_text(best, n: int) -> str:
        return "best: none within the KL budget" if best is None else \
            f"best: {best[0]}/{n} refusals (proxy), KL {best[1]:.4f} (trial {best[2]})"

    def confirm(self, tokens: int, top: int, interrupted: bool) -> tuple[dict[int, int], bool]:
        """Real answers for the base model and the ``top`` best trials within the budget (harmful
        confirmation prompts; borderline validation prompts too, when there are any)."""
        confirmed: dict[int, int] = {}
        try:
            self.editor.restore()
            self.scorer.unchanged = self.num_layers
            self.base_confirmed = sum(self.scorer.refusals(tokens, stop_early=True, confirm=True))
            self.base_over = self._over_refusals(tokens)
            done = self.completed()
            inside = [t for t in done if t.values[1] <= self.budget(done)]
            ranked = sorted(inside, key=lambda t: (t.values[0], t.values[1], t.number))[:top]
            start = self.start_trial(done)
            answered = start is not None and start.user_attrs.get("answered", True)
            if answered and start.number not in {t.number for t in ranked}:
                ranked.append(start)  # the default ablation, confirmed for comparison
            for t in ranked:
                self.apply(t.params)
                refused = sum(self.scorer.refusals(tokens, stop_early=True, confirm=True))
                over = self._over_refusals(tokens)
                confirmed[t.number] = refused  # both or neither, should Ctrl-C come in between
                if over is not None:
                    self.over[t.number] = over
        except KeyboardInterrupt:
            self.log.message("search: confirmation interrupted; unconfirmed trials are ranked by the proxy")
            interrupted = True
        return confirmed, interrupted

    def _over_refusals(self, tokens: int) -> int | None:
        """Borderline validation prompts the model as it is now refuses (None: no borderline set)."""
        return sum(self.scorer.over_refusals(tokens)) if self.scorer.borderline_ids else None

    # --- result --------------------------------------------------------------------------------

    def document(self, trials: int, confirmed: dict[int, int], interrupted: bool, confirm_tokens: int,
                 confirm_top: int, format_: int) -> dict:
        from abliterate.search_space import pareto_front, ranges

        done = self.completed(trials)
        answered = {t.number for t in done if t.user_attrs.get("answered", True)}
        front = pareto_front({t.number: (t.values[0], t.values[1]) for t in done if t.number in answered})
        budget = self.budget(done)
        inside = [t for t in done if t.values[1] <= budget]
        ranked = [t for t in inside if t.number in confirmed] or inside
        # fewest refusals; then fewest borderline prompts refused (over-refusal), then the lowest KL
        pick = min(ranked, key=lambda t: (confirmed.get(t.number, t.values[0]), self.over.get(t.number, 0),
                                          t.values[1], t.number), default=None)
        chosen = None
        if pick is not None:
            chosen = {"trial": pick.number, "refusals": confirmed.get(pick.number),
                      "over_refusals": self.over.get(pick.number),
                      "refusals_proxy": int(pick.values[0]), "kl": float(pick.values[1]),
                      "params": dict(sorted(pick.params.items())), "measurement": float(pick.params["measurement"]),
                      "layers": [e.to_json() for e in self.layer_edits(pick.params)]}
        return {
            "format": format_, "status": "interrupted" if interrupted else "done", "trials_requested": trials,
            "trials_run": len(done), "chosen": chosen, "pareto": sorted(front),
            "inputs": {"key": self.key, "directions_sha256": self.directions_sha, "model": str(self.model_dir),
                       "model_type": self.config.get("model_type"), "num_layers": self.num_layers,
                       "hidden_size": int(self.config["hidden_size"])},
            "options": self.options.to_json(),
            "start": self._start_doc(done, answered, confirmed),
            "settings": {"kl_budget": budget if budget != float("inf") else None,
                         "kl_budget_from": "default ablation" if self.fixed_budget is None else "search.kl-budget",
                         "seed": self.seed, "proxy_tokens": self.proxy_tokens,
                         "confirm_tokens": confirm_tokens, "confirm_top": confirm_top,
                         "confirm_prompts": len(self.sets.confirm)},
            "validation": self.sets.info, "space": {k: list(v) for k, v in ranges(self.num_layers).items()},
            "base": {"refusals": self.base_confirmed, "refusals_proxy": self.base_proxy,
                     "over_refusals": self.base_over},
            "trials": [{"trial": t.number, "kl": float(t.values[1]),
                        "refusals_proxy": int(t.values[0]) if t.number in answered else None,
                        "refusals": confirmed.get(t.number), "over_refusals": self.over.get(t.number),
                        "pareto": t.number in front,
                        "params": dict(sorted(t.params.items())),
                        **({"layers": [e.to_json() for e in self.layer_edits(t.params)]} if t.number in front else {})}
                       for t in done],
        }

    def _start_doc(self, done: list, answered: set, confirmed: dict[int, int]) -> dict | None:
        """The default ablation's trial in ``search.json`` (None: the search had no start point)."""
        start = self.start_trial(done)
        if start is None:
            return None
        return {"trial": start.number, "kl": float(start.values[1]), "refusals": confirmed.get(start.number),
                "over_refusals": self.over.get(start.number),
                "refusals_proxy": int(start.values[0]) if start.number in answered else None,
                "layers": [e.to_json() for e in self.layer_edits(start.params)]}

    def close(self) -> None:
        self.editor.close()


def _check_fits(model_dir: Path, dtype: str, device: str) -> None:
    """The search edits the loaded weights in place trial after trial: it needs the model in memory."""
    from abliterate.model.streaming import compute_bytes, free_bytes, place

    if place("auto", model_dir, dtype, device) == "stream":
        fail(f"search needs the model in memory ({compute_bytes(model_dir, dtype) / 2**30:.1f} GB in {dtype}, "
             f"{free_bytes(device)[0] / 2**30:.1f} GB free on {device}); set search.trials: 0 (the default ablation "
             "needs no search), or run it where the model fits (capture, baseline and evaluate stream)")
