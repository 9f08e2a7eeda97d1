"""The ``critic`` recipe's weighting (DESIGN §4 v3): a value head on a frozen trunk's features, fitted in stage 1
on Monte-Carlo returns with held-out early stopping, GAE-advantage soft weights and the value loss of stage 2.
The tensor math lives in `wmtp_lib.train.critic`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from wmtp_lib.data.rows import Batch, TokenizedData, move_batch
from wmtp_lib.data.schedule import BatchSchedule
from wmtp_lib.model.losses import critic_weights, target_valid
from wmtp_lib.model.step import BatchWeights, HeadWeightFn
from wmtp_lib.train.critic import (
    advantages,
    align_scores,
    auc,
    bootstrap_mask,
    explained_variance,
    last_states,
    mc_returns,
    seeded_value_head,
    sparse_rewards,
    state_mask_from_labels,
    value_loss,
)
from wmtp_lib.train.distributed import Dist
from wmtp_lib.train.rewards import reward_model_trunk, sequence_rewards
from wmtp_lib.train.weighting import PrecomputedWeights


class CriticHeadWeights:
    """Critic weights of one micro-batch from the advantages of its states (micro-batch group)."""

    def __init__(self, weighting: "CriticWeighting", batch: Batch):
        self.weighting = weighting
        self.batch = batch

    def __call__(self, trunk_hidden: torch.Tensor) -> HeadWeightFn:
        score = self.weighting.score(trunk_hidden, self.batch)
        valid = target_valid(self.batch["label_mask"], self.weighting.H, self.batch.get("position_ids"))
        return PrecomputedWeights(self.weighting.weights_from_scores(score, valid))


class ValueTerm:
    """``value_coef · MSE`` of the value head on a micro-batch's features: a `TrunkLoss` (records the MSE it
    computed and the term it added)."""

    def __init__(self, weighting: "CriticWeighting", batch: Batch):
        self.weighting = weighting
        self.batch = batch
        self.value: torch.Tensor | None = None

    def __call__(self, trunk_hidden: torch.Tensor) -> torch.Tensor:
        to_trunk = self.weighting.ccfg["value_grad_to_trunk"]
        features = self.weighting.features(trunk_hidden if to_trunk else trunk_hidden.detach(), self.batch)
        loss = self.weighting.value_loss(features, self.batch, n_states=self.weighting.window_states)
        self.value = loss.detach()
        return self.weighting.ccfg["value_coef"] * loss

    @property
    def added(self) -> torch.Tensor | None:
        """The term added to the step's loss, detached, in float64 (the logs subtract it from the loss)."""
        return None if self.value is None else self.weighting.ccfg["value_coef"] * self.value.double()


class Transitions:
    """A micro-batch's states, terminal rewards and bootstrap positions (DESIGN §4), from its label mask and
    the host tables of sequence rewards and cut documents."""

    def __init__(self, batch: Batch, rewards: torch.Tensor, cut: torch.Tensor, device):
        position_ids = batch.get("position_ids")
        rows = batch["row_index"]
        cut_rows = cut[rows].to(device)
        self.states = state_mask_from_labels(batch["label_mask"], position_ids)
        self.rewards = sparse_rewards(rewards[rows].to(device), self.states, position_ids, cut_rows)
        self.bootstrap = bootstrap_mask(self.states, cut_rows, position_ids)


class Stage1Fit:
    """Stage 1's early stopping on held-out explained variance: the best value head so far and the count of
    evaluations without improvement (checkpointed, so a resumed stage 1 stops where an uninterrupted one does)."""

    def __init__(self):
        self.best_ev = float("-inf")
        self.best_step = 0
        self.bad_evals = 0
        self.best_head: dict[str, torch.Tensor] | None = None
        self.best: dict[str, Any] = {}  # the best evaluation's record: step, explained variance, R², AUC
        self.steps_run = 0

    def update(self, record: dict[str, Any], head: torch.nn.Module) -> bool:
        """Record an evaluation (``step``, ``explained_variance``, ...); True when it improved on the best."""
        self.steps_run = record["step"]
        ev = record["explained_variance"]
        if ev == ev and ev > self.best_ev:  # nan (no variance to explain) never improves
            self.best_ev, self.best_step, self.bad_evals = ev, record["step"], 0
            self.best_head = {k: v.detach().clone() for k, v in head.state_dict().items()}
            self.best = dict(record)
            return True
        self.bad_evals += 1
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"best_ev": self.best_ev, "best_step": self.best_step, "bad_evals": self.bad_evals,
                "best_head": self.best_head, "best": dict(self.best), "steps_run": self.steps_run}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_ev, self.best_step = state["best_ev"], state["best_step"]
        self.bad_evals, self.best_head, self.best = state["bad_evals"], state["best_head"], dict(state["best"])
        self.steps_run = state["steps_run"]


def heldout_split(groups: list[str], n_heldout: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit rows, held-out rows) of stage 1, split by group (a row's prompt): whole prompts are held out, a
    seeded draw of them until about ``min(n_heldout, rows // 5)`` rows, so no held-out state shares its prompt
    prefix with a fitted one (rollouts of one prompt, or the synthetic tasks' repeated statements). One group:
    nothing is held out."""
    order = list(dict.fromkeys(groups))
    rows_of: dict[str, list[int]] = {g: [] for g in order}
    for i, g in enumerate(groups):
        rows_of[g].append(i)
    target = min(n_heldout, len(groups) // 5)
    held: list[int] = []
    if len(order) > 1:
        for j in torch.randperm(len(order), generator=torch.Generator().manual_seed(seed * 7919 + 17)).tolist():
            if len(held) >= max(1, target) or len(held) + len(rows_of[order[j]]) > len(groups) // 2:
                continue
            held += rows_of[order[j]]
    held_set = set(held)
    fit = [i for i in range(len(groups)) if i not in held_set]
    return torch.tensor(fit, dtype=torch.long), torch.tensor(sorted(held), dtype=torch.long)


def row_prompts(data: TokenizedData, samples) -> list[str]:
    """The prompt of each row's (first) document: the group `heldout_split` keeps together."""
    first = data.sample_index.clamp(min=0)[:, 0].tolist()
    return [samples[i].prompt for i in first]


class CriticWeighting:
    """``critic``: value head on a frozen trunk's features, GAE-advantage soft weights, value loss; stage 1 fits
    the head on Monte-Carlo returns until its held-out explained variance stops improving."""

    needs_scores = True

    def __init__(self, cfg: dict[str, Any], H: int, hidden_size: int, rewards: torch.Tensor, cut: torch.Tensor,
                 eos_token_id: int, device, value_trunk: torch.nn.Module | None = None):
        self.cfg = cfg["weights"]
        self.ccfg = cfg["critic"]
        self.H = H
        self.rewards = rewards  # (N, T) host map: every token holds its sample's sequence reward
        self.cut = cut  # (N, T) host map: tokens of documents cut by max_length (no terminal reward)
        self.eos_token_id = eos_token_id
        # the reward model's decoder when critic.value_trunk is reward_model (frozen; None: the MTP trunk)
        self.value_trunk = value_trunk
        features = hidden_size if value_trunk is None else value_trunk.config.hidden_size
        self.value_head = seeded_value_head(features, cfg["seed"]).to(device)
        self.optimizer = torch.optim.AdamW(self.value_head.parameters(), lr=self.ccfg["stage1_lr"])
        self.device = device
        self.window_states: torch.Tensor | None = None  # states of the current optimizer step (begin_window)
        self.fit = Stage1Fit()
        self._trunk_features: tuple[torch.Tensor, torch.Tensor] | None = None  # (input_ids, features) of the last batch
        self._transitions: tuple[torch.Tensor, Transitions] | None = None  # (input_ids, transitions) of the last batch

    @classmethod
    def build(cls, cfg: dict[str, Any], H: int, hidden_size: int, tokenizer, samples, data: TokenizedData,
              dist: Dist, run_dir: Path, model_dir: Callable[[str], Path]) -> "CriticWeighting":
        rewards = sequence_rewards(cfg, tokenizer, samples, data, dist, run_dir, model_dir)
        value_trunk = None
        if cfg["critic"]["value_trunk"] == "reward_model":
            value_trunk = reward_model_trunk(cfg, tokenizer, samples, model_dir(cfg["models"]["reward"]), dist)
        return cls(cfg, H, hidden_size, rewards, data.cut_documents(tokenizer.eos_token_id), tokenizer.eos_token_id,
                   dist.device, value_trunk)

    # features, scores, weights --------------------------------------------------------
    def features(self, trunk_hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        """What the value head reads at each prefix ``(B, T, D)``: the MTP trunk output, or the reward model's
        last hidden state (computed once per micro-batch, no gradient)."""
        if self.value_trunk is None:
            return trunk_hidden
        ids = batch["input_ids"]
        if self._trunk_features is None or self._trunk_features[0] is not ids:
            from wmtp_lib.train.reference import backbone_hidden

            with torch.no_grad():
                hidden = backbone_hidden(self.value_trunk, ids, batch["attention_mask"], batch.get("position_ids"))
            self._trunk_features = (ids, hidden)
        return self._trunk_features[1]

    def transitions(self, batch: Batch, rewards: torch.Tensor | None = None, cut: torch.Tensor | None = None
                    ) -> Transitions:
        """The micro-batch's `Transitions`, built once: its host-to-device copies happen when the micro-batch
        starts (`for_batch`, before the forward), not between the step's kernels."""
        if rewards is None and cut is None:
            if self._transitions is None or self._transitions[0] is not batch["input_ids"]:
                self._transitions = (batch["input_ids"], Transitions(batch, self.rewards, self.cut, self.device))
            return self._transitions[1]
        return Transitions(batch, self.rewards if rewards is None else rewards, self.cut if cut is None else cut,
                           self.device)

    @torch.no_grad()
    def score(self, trunk_hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Aligned advantages ``s[b, t, k] = A_{t+k}`` ``(B, T, H)``, ``λ_w = critic.score_lambda`` (DESIGN §4)."""
        tr = self.transitions(batch)
        values = self.value_head(self.features(trunk_hidden.detach(), batch))
        adv = advantages(values, tr.rewards, tr.states, self.ccfg["gamma"], self.ccfg["score_lambda"], tr.bootstrap)
        return align_scores(adv, self.H)

    def for_batch(self, batch: Batch, precomputed: torch.Tensor | None = None) -> BatchWeights:
        """The micro-batch's `BatchWeights`: advantage weights from the step's trunk output (or the
        ``weight_group: global`` ones) and the value loss on it (`ValueTerm`, which keeps the MSE it computed)."""
        self.transitions(batch)  # before the forward: see `transitions`
        if precomputed is None:
            return BatchWeights(weight_fn=CriticHeadWeights(self, batch), trunk_loss=ValueTerm(self, batch))
        fixed = PrecomputedWeights(precomputed)
        return BatchWeights(weight_fn=lambda trunk_hidden: fixed, trunk_loss=ValueTerm(self, batch))

    @torch.no_grad()
    def scores(self, model, batch: Batch) -> torch.Tensor:
        trunk = model(batch["input_ids"], batch["attention_mask"], position_ids=batch.get("position_ids"),
                      return_trunk=True).hidden
        return self.score(trunk, batch)

    def weights_from_scores(self, scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return critic_weights(scores, valid, temperature=self.cfg["temperature"], max_weight=self.cfg["max_weight"],
                              standardize=self.cfg["standardize"])

    # the value loss (both stages) --------------------------------------------------------
    def begin_window(self, batches: list[Batch], dist: Dist) -> None:
        """Count the states of the optimizer step (all micro-batches and ranks; one all-reduce): the value
        loss divides by it, like the MTP loss by ``N_k``."""
        local = sum(state_mask_from_labels(b["label_mask"], b.get("position_ids")).sum() for b in batches)
        self.window_states = dist.sum(torch.as_tensor(local, dtype=torch.float32, device=dist.device))

    def value_loss(self, features: torch.Tensor, batch: Batch, row_rewards: torch.Tensor | None = None,
                   n_states: torch.Tensor | None = None, row_cut: torch.Tensor | None = None) -> torch.Tensor:
        """MSE of ``V`` against Monte-Carlo returns (λ = 1; a cut document's return bootstraps from ``V``)."""
        tr = self.transitions(batch, row_rewards, row_cut)
        values = self.value_head(features)
        targets = mc_returns(tr.rewards, tr.states, self.ccfg["gamma"], values, tr.bootstrap)
        return value_loss(values, targets, tr.states, n_states)

    def sync_grads(self, dist: Dist) -> torch.Tensor:
        """Average the value head's gradients over processes; returns their total norm (a device tensor, the
        same on every rank), which the caller checks for finiteness before any optimizer steps."""
        params = list(self.value_head.parameters())
        dist.average_grads(params)
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.device)
        return torch.nn.utils.get_total_norm(grads)

    def optimizer_step(self, skip: bool) -> None:
        """Step the value head's optimizer on its synchronised gradients (unless skipped), then zero them."""
        if not skip:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def enter_stage2(self, lr: float) -> None:
        """Stage 2 keeps V current with its own optimizer at the training learning rate."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict[str, Any]:
        return {"value_head": self.value_head.state_dict(), "value_optimizer": self.optimizer.state_dict(),
                "stage1": self.fit.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value_head.load_state_dict(state["value_head"])
        self.optimizer.load_state_dict(state["value_optimizer"])
        self.fit.load_state_dict(state["stage1"])

    def summary(self) -> dict[str, Any]:
        """What stage 1 reached, for ``summary.json``."""
        best = self.fit.best  # every number of the head stage 2 starts with
        return {"stage1_best_step": self.fit.best_step, "stage1_explained_variance": _finite_or_none(self.fit.best_ev),
                "stage1_r2": _finite_or_none(best.get("r2")),
                "stage1_last_state_auc": _finite_or_none(best.get("last_state_auc")),
                "stage1_steps_run": self.fit.steps_run}

    # stage 1 ---------------------------------------------------------------------------
    def stage1_data(self, trainer) -> tuple[TokenizedData, torch.Tensor, list]:
        """Gold rows with their rewards and samples, or (execution reward) rollouts of the current model,
        sampled on every process through the sharded model and cached in the run directory for a resume."""
        if self.ccfg["reward_source"] != "execution":
            return trainer.data, self.rewards, trainer.samples
        from wmtp_lib.train.rollouts import build_rollout_data

        return build_rollout_data(trainer.model, trainer.tokenizer, trainer.samples, trainer.cfg,
                                  trainer.run_dir / "rollouts.json", trainer.dist)

    @torch.no_grad()
    def evaluate(self, trainer, data: TokenizedData, rewards: torch.Tensor, cut: torch.Tensor,
                 rows: torch.Tensor) -> dict[str, float]:
        """Explained variance of ``V`` against the Monte-Carlo returns on the held-out rows' states, and (rows
        with clean and noisy samples) the clean-vs-corrupted AUC of ``V`` at each document's last state.

        Every rank evaluates all held-out rows (the same forwards, so FSDP's collectives match): no gather.
        """
        values, targets, last_clean, last_noisy = [], [], [], []
        micro = trainer.cfg["train"]["micro_batch_size"]
        for start in range(0, len(rows), micro):
            batch = move_batch(data.rows(rows[start:start + micro]), trainer.dist.device)
            v = self.value_head(self.features(self.trunk_output(trainer.model, batch), batch))
            tr = self.transitions(batch, rewards, cut)
            g = mc_returns(tr.rewards, tr.states, self.ccfg["gamma"], v, tr.bootstrap)
            values.append(v[tr.states].cpu())
            targets.append(g[tr.states].cpu())
            last = last_states(tr.states, batch.get("position_ids"))
            noisy = batch["noisy"].bool()
            last_clean.append(v[last & ~noisy].cpu())
            last_noisy.append(v[last & noisy].cpu())
        if not values:
            return {"explained_variance": float("nan"), "r2": float("nan"), "last_state_auc": float("nan")}
        v, g = torch.cat(values).double(), torch.cat(targets).double()
        # R² also counts a constant offset of V, which explained variance ignores and which, with γ = 1, lands
        # on the last transition's TD error
        r2 = float(1 - (g - v).pow(2).mean() / g.var(unbiased=False)) if g.numel() > 1 and g.var() > 0 else float("nan")
        return {"explained_variance": explained_variance(v, g), "r2": r2,
                "last_state_auc": auc(torch.cat(last_clean), torch.cat(last_noisy))}

    def trunk_output(self, model, batch: Batch) -> torch.Tensor | None:
        """The MTP trunk's output for V's features, or None when V reads the reward model (no base forward).
        Every rank makes the same choice, so FSDP's collectives stay matched."""
        if self.value_trunk is not None:
            return None
        with torch.no_grad():
            return model(batch["input_ids"], batch["attention_mask"], position_ids=batch.get("position_ids"),
                         return_trunk=True).hidden

    def fit_value_head(self, trainer, start: int) -> int | None:
        """Stage 1: the trunk frozen, fit V by MSE on Monte-Carlo returns over the fit rows, evaluating the
        held-out explained variance every ``stage1_eval_every`` steps; stop after ``stage1_patience``
        evaluations without improvement (or at ``stage1_max_steps``) and keep the best head. Checkpoints as
        ``value-<step>``; ends by switching V's optimizer to the stage-2 learning rate and saving
        ``mtp-0000000``, so a resume right after stage 1 continues with the same value head and state.
        Stopped on request (SIGTERM: `Trainer.agree`), it checkpoints the step it stopped after and returns
        that step; None when stage 1 ran to its end."""
        cfg, dist, ccfg = trainer.cfg, trainer.dist, self.ccfg
        steps, log_every, eval_every = ccfg["stage1_max_steps"], cfg["train"]["log_every"], ccfg["stage1_eval_every"]
        data, rewards, samples = self.stage1_data(trainer)
        cut = data.cut_documents(self.eos_token_id)
        fit_rows, held_rows = heldout_split(row_prompts(data, samples), ccfg["stage1_heldout_rows"], cfg["seed"])
        if len(held_rows) == 0:
            dist.print("[value] one prompt only: no held-out rows, stage 1 runs stage1_max_steps without evaluation")
        accum = cfg["train"]["grad_accum"]
        # the same global batch per step as training (micro × accum × processes), so the split does not matter
        schedule = BatchSchedule(len(fit_rows), cfg["train"]["micro_batch_size"], accum, dist.world, cfg["seed"] + 1)
        window = torch.zeros(3, dtype=torch.float64, device=dist.device)  # Σ value loss, finite steps, skipped
        done = start
        for step in range(start, steps):
            batches = [move_batch(data.rows(fit_rows[schedule.micro_batch(step, slot, dist.rank)]), dist.device)
                       for slot in range(accum)]
            self.begin_window(batches, dist)
            step_loss = torch.zeros((), dtype=torch.float64, device=dist.device)
            for batch in batches:
                trunk = self.trunk_output(trainer.model, batch)
                loss = self.value_loss(self.features(trunk, batch), batch, rewards, n_states=self.window_states,
                                       row_cut=cut)
                (loss * dist.world).backward()  # the gradient average over ranks then gives the step's mean
                step_loss += loss.detach().double()
            grad_norm = self.sync_grads(dist)
            # as in stage 2: a non-finite value loss or gradient norm on any process skips the step everywhere
            bad = (~torch.isfinite(step_loss)) | (~torch.isfinite(grad_norm))
            finite = trainer.agree(bad)
            self.optimizer_step(skip=not finite)
            if finite:
                window[0] += step_loss
                window[1] += 1
            else:
                window[2] += 1
            done = step + 1
            record: dict[str, Any] = {}
            if len(held_rows) and (done % eval_every == 0 or done == steps):
                record = {"step": done, **self.evaluate(trainer, data, rewards, cut, held_rows)}
                # rank 0's numbers decide for all: ranks that stopped at different steps would hang
                record = dist.broadcast_object(record)
                self.fit.update(record, self.value_head)
            if done % log_every == 0 or done == steps or record:
                total, count, skipped = dist.sum(window).tolist()
                count, skipped = count / dist.world, int(skipped / dist.world)  # every rank counted each step once
                mean = total / count if count else None  # no finite step in the window: no measured loss
                ev, area = record.get("explained_variance"), record.get("last_state_auc")
                trainer.metrics.write({"stage": "value", "step": done, "value_loss": mean, "value_lr": self.lr,
                                       "skipped_steps": skipped, "explained_variance": _finite_or_none(ev),
                                       "r2": _finite_or_none(record.get("r2")),
                                       "last_state_auc": _finite_or_none(area)})
                line = f"[value] step {done}/{steps} value_loss {'n/a' if mean is None else f'{mean:.4f}'}"
                if record:
                    line += f" held-out explained variance {ev:.3f}" + (f" AUC {area:.3f}" if area == area else "")
                dist.print(line + f" skipped {skipped}")
                window.zero_()
            trainer.check_finite(done, finite)
            if self.fit.bad_evals >= ccfg["stage1_patience"]:
                dist.print(f"[value] held-out explained variance has not improved for {self.fit.bad_evals} "
                           f"evaluations: stage 1 stops at step {done}, keeping step {self.fit.best_step}'s head")
                break
            if (done % cfg["train"]["save_every"] == 0 and done < steps) or trainer.stop_agreed:
                trainer.checkpointer.save(done, "value")
            if trainer.stop_agreed:
                return done
        if self.fit.best_head is not None:
            self.value_head.load_state_dict(self.fit.best_head)
        # stage 2 starts its own optimizer: the moments of stage 1's last (maybe discarded) steps are not the head's
        self.optimizer = torch.optim.AdamW(self.value_head.parameters(), lr=self.ccfg["stage1_lr"])
        best = self.fit.best_ev
        if not best > 0:
            dist.print(f"warning: the value head explains nothing of the held-out returns (explained variance "
                       f"{best:.3f} ≤ 0): stage 2's critic weights carry no credit assignment")
        else:
            dist.print(f"stage 2 starts with the value head of step {self.fit.best_step}: held-out explained "
                       f"variance {best:.3f}")
        if dist.is_main:
            self.save_value_head(trainer.run_dir / "value_head_stage1.safetensors")
        self.enter_stage2(cfg["train"]["lr"])
        trainer.checkpointer.save(0, "mtp")
        return None

    def save_value_head(self, path: Path) -> None:
        save_file({k: v.contiguous() for k, v in self.value_head.state_dict().items()}, str(path))


def _finite_or_none(x: float | None) -> float | None:
    return None if x is None or x != x or x in (float("inf"), float("-inf")) else float(x)
