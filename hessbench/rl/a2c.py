"""Advantage actor-critic (A2C) on a gymnasium classic-control environment, one run.

Per update, ``num_envs`` environments each take ``n_steps`` steps with actions
sampled from the actor's categorical policy; ``n``-step returns
``R_t = r_t + gamma r_{t+1} + ... + gamma^k V(s_{t+k})`` bootstrap from the critic
(an episode that ends by termination contributes no bootstrap; one cut off by the
time limit bootstraps from the critic's value of its last observation). Then

- the **actor** takes one step of the optimizer under test on the loss
  ``(1/N) sum_i A_i CE(logits_i, a_i)`` = ``-(1/N) sum_i A_i log pi(a_i | s_i)``, with
  advantages ``A_i = R_i - V(s_i)`` held fixed: a
  :class:`~hessbench.estimators.losses.WeightedCrossEntropyLoss`, so every estimator sees the
  true policy loss (no entropy bonus, which is not a weighted cross-entropy);
- the **critic** takes one ``torch.optim.Adam`` step (``critic_lr``) on the MSE
  to the returns, whatever the actor's optimizer, so only the actor's optimizer
  differs between runs.

Randomness: the networks are initialised (orthogonal, as is usual for A2C) and the
actions drawn from the run's own ``torch.Generator`` (seeded with the run seed);
environment ``i`` is reset with seed ``seed * 1000 + i`` once and then continues
its own stream. The global RNG is never used, so a seed gives the same curve.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from hessbench.errors import DivergenceError, HessbenchError
from hessbench.estimators.losses import WeightedCrossEntropyLoss
from hessbench.rl.schema import RLRunSpec

__all__ = ["FINAL_FRACTION", "final_return", "require_gymnasium", "run_a2c"]

FINAL_FRACTION = 0.2
"""The final return of a run averages the curve over this last fraction of env steps."""


def require_gymnasium() -> Any:
    """The ``gymnasium`` module, or a one-line :class:`HessbenchError` saying how to get it."""
    try:
        import gymnasium
    except ImportError:
        raise HessbenchError(
            "rl suites need gymnasium, which is not installed: pip install 'hessbench[rl]'"
        ) from None
    return gymnasium


def mlp(sizes: list[int], last_gain: float, generator: torch.Generator) -> nn.Sequential:
    """``Linear``/``Tanh`` layers, orthogonally initialised from ``generator`` (gain sqrt 2).

    The layers are built on the meta device, so torch's default initialisation
    never draws from the global RNG.
    """
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        if i:
            layers.append(nn.Tanh())
        layers.append(nn.Linear(a, b, device="meta"))
    model = nn.Sequential(*layers).to_empty(device="cpu")
    linears = [m for m in model if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for i, m in enumerate(linears):
            gain = last_gain if i == len(linears) - 1 else math.sqrt(2.0)
            nn.init.orthogonal_(m.weight, gain, generator=generator)
            m.bias.zero_()
    return model


def final_return(steps: list[int], returns: list[float | None], total_steps: int) -> float | None:
    """Mean of the curve's points in the last :data:`FINAL_FRACTION` of ``total_steps``.

    At least the last point counts; points without a finished episode yet are
    skipped. ``None`` when nothing is left.
    """
    start = (1.0 - FINAL_FRACTION) * total_steps
    pts = [r for s, r in zip(steps, returns, strict=True) if s > start and r is not None]
    if not pts and returns and returns[-1] is not None:
        pts = [returns[-1]]
    return float(np.mean(pts)) if pts else None


def _finite(t: Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def run_a2c(run: RLRunSpec, on_point: Callable[[int], None] = lambda step: None) -> dict:
    """Train one run; return its record (``status`` ok, diverged or error, never raises).

    ``on_point(env_steps)`` is called at every curve point (progress reporting).
    """
    from hessbench.optim import make_stepper  # imports the estimators

    suite, seed = run.suite, run.seed
    rec: dict[str, Any] = {
        "cell_id": run.id,
        "kind": "rl",
        "env": suite.env,
        "optimizer": run.optimizer.name,
        "label": run.optimizer.display,
        "order": suite.optimizers.index(run.optimizer),
        "params": dict(run.optimizer.params),
        "lr": run.lr,
        "seed": seed,
        "total_steps": suite.total_steps,
    }
    curve: dict[str, list] = {"step": [], "return": [], "episodes": [], "time_s": []}
    episodes: list[list[float]] = []
    steps = 0
    start = time.perf_counter()
    try:
        gym = require_gymnasium()
        envs = [gym.make(suite.env) for _ in range(suite.num_envs)]
        obs = np.stack([e.reset(seed=seed * 1000 + i)[0] for i, e in enumerate(envs)])
        gen = torch.Generator().manual_seed(seed)
        n_obs, n_act = int(np.prod(envs[0].observation_space.shape)), int(envs[0].action_space.n)
        actor = mlp([n_obs, *suite.hidden, n_act], 0.01, gen)
        critic = mlp([n_obs, *suite.hidden, 1], 1.0, gen)
        rec["num_params"] = sum(p.numel() for p in actor.parameters())
        policy_loss = WeightedCrossEntropyLoss()
        overrides = {"seed": seed, **run.optimizer.params}
        actor_opt = make_stepper(run.optimizer.name, actor, policy_loss, run.lr, **overrides)
        critic_opt = make_stepper("adam", critic, nn.MSELoss(), suite.critic_lr, seed=seed)
        ep_return = np.zeros(suite.num_envs)
        next_point, update = suite.eval_every, 0
        while steps < suite.total_steps:
            update += 1
            batch_obs, batch_act, rewards, dones = [], [], [], []
            for _ in range(suite.n_steps):
                x = torch.as_tensor(obs, dtype=torch.float32)
                with torch.no_grad():
                    logits = actor(x)
                if not _finite(logits):
                    raise DivergenceError(f"diverged at update {update}: non-finite logits", update)
                act = torch.multinomial(torch.softmax(logits, 1), 1, generator=gen).squeeze(1)
                r = np.zeros(suite.num_envs)
                done = np.zeros(suite.num_envs)
                new_obs = np.empty_like(obs)
                steps += suite.num_envs
                for i, env in enumerate(envs):
                    o, r[i], term, trunc, _ = env.step(int(act[i]))
                    ep_return[i] += r[i]
                    if trunc and not term:  # cut off by the time limit: bootstrap from V(s')
                        with torch.no_grad():
                            v = critic(torch.as_tensor(o, dtype=torch.float32).unsqueeze(0))
                        r[i] += suite.gamma * float(v)
                    if term or trunc:
                        episodes.append([steps, float(ep_return[i])])
                        ep_return[i] = 0.0
                        done[i] = 1.0
                        o, _ = env.reset()
                    new_obs[i] = o
                batch_obs.append(x)
                batch_act.append(act)
                rewards.append(r)
                dones.append(done)
                obs = new_obs
            with torch.no_grad():
                ret = critic(torch.as_tensor(obs, dtype=torch.float32))[:, 0].double().numpy()
            returns = []
            for r, d in zip(reversed(rewards), reversed(dones), strict=True):
                ret = r + suite.gamma * ret * (1.0 - d)
                returns.append(ret)
            target = torch.as_tensor(np.stack(returns[::-1]).reshape(-1), dtype=torch.float32)
            x = torch.cat(batch_obs)
            a = torch.cat(batch_act)
            with torch.no_grad():
                adv = target - critic(x)[:, 0]
            if suite.normalize_advantages:
                adv = (adv - adv.mean()) / (adv.std() + 1e-8)
            if not _finite(adv):
                raise DivergenceError(f"diverged at update {update}: non-finite advantages", update)
            policy_loss.set_weights(adv)
            actor_opt.step(x, a)
            critic_opt.step(x, target.unsqueeze(1))
            while steps >= next_point:
                recent = [er for _, er in episodes[-suite.return_window :]]
                curve["step"].append(steps)
                curve["return"].append(float(np.mean(recent)) if recent else None)
                curve["episodes"].append(len(episodes))
                curve["time_s"].append(time.perf_counter() - start)
                next_point += suite.eval_every
                on_point(steps)
        rec["status"] = "ok"
    except DivergenceError as exc:
        rec.update(status="diverged", message=str(exc), diverged_at=steps)
    except HessbenchError as exc:
        rec.update(status="error", message=str(exc).splitlines()[0])
    rec["steps_done"] = steps
    rec["train_time_s"] = time.perf_counter() - start
    rec["curve"] = curve
    rec["episodes"] = episodes
    ok = rec["status"] == "ok"
    rec["final_return"] = (
        final_return(curve["step"], curve["return"], suite.total_steps) if ok else None
    )
    return rec
