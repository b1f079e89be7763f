"""--compile must change the parameters exactly as eager does (within float rounding), not just run fast."""

import pytest
import torch


def _agent(qsm, S=5, A=2):
    torch.manual_seed(0)
    args = qsm.Args(critic_hidden_dims=(64, 64), actor_hidden_dims=(64, 64), critic_lr=1e-3, actor_lr=1e-3, cuda=False)
    return qsm.build_agent(S, A, args, "cpu"), args


def _train(qsm, agent, args, batches, steps=4):
    metrics = []
    for i in range(steps):
        torch.manual_seed(100 + i)
        m = qsm.train_step(agent, batches[i], args)
        m["action"] = qsm.ddpm_sample(agent.denoiser, agent.noise_schedule, batches[i].obs[:3])
        metrics.append(m)
    return metrics


def _modules(agent):
    return [agent.critic, agent.critic_target, agent.denoiser]


@pytest.fixture
def fallback_random():
    """The compiled graphs draw their random numbers with eager's generator, in eager's order. Through the config's own
    patch: monkeypatch's undo deletes the option, and every later compilation in the process then fails."""
    with torch._inductor.config.patch(fallback_random=True):
        yield


def test_compiled_updates_match_eager(qsm, monkeypatch, fallback_random):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(1)
    batches = [
        qsm.Batch(
            torch.randn(32, 5, generator=g),
            torch.rand(32, 2, generator=g) * 2 - 1,
            torch.randn(32, generator=g),
            torch.randn(32, 5, generator=g),
            (torch.rand(32, generator=g) > 0.1).float(),
        )
        for _ in range(4)
    ]
    eager, args = _agent(qsm)
    initial = [p.detach().clone() for module in _modules(eager) for p in module.parameters()]
    eager_metrics = _train(qsm, eager, args, batches)

    compiled, _ = _agent(qsm)
    for name in ("critic_loss", "qsm_loss", "ddpm_sample"):  # what --compile does
        monkeypatch.setattr(qsm, name, torch.compile(getattr(qsm, name)))
    compiled_metrics = _train(qsm, compiled, args, batches)

    for module_e, module_c in zip(_modules(eager), _modules(compiled), strict=True):
        for p_e, p_c in zip(module_e.parameters(), module_c.parameters(), strict=True):
            torch.testing.assert_close(p_c, p_e, rtol=1e-4, atol=1e-5)
    final = [p.detach() for module in _modules(eager) for p in module.parameters()]
    assert all(not torch.equal(p0, p1) for p0, p1 in zip(initial, final, strict=True))  # every parameter moved
    for m_e, m_c in zip(eager_metrics, compiled_metrics, strict=True):
        assert m_e.keys() == m_c.keys()
        for key in m_e:
            torch.testing.assert_close(m_c[key], m_e[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("score_target", ["paper", "denoising"])
def test_compiled_losses_and_sampler_are_one_graph_each(qsm, score_target):
    """No graph breaks: grad_a Q (torch.func.grad) is traced into the QSM loss's graph, not split around it."""
    torch._dynamo.reset()
    agent, args = _agent(qsm)
    args.score_target, args.normalize_q_grad, args.sampler_clip, args.M_q = score_target, True, "x0_hat", 3.0
    obs, actions = torch.randn(32, 5), torch.rand(32, 2) * 2 - 1
    batch = qsm.Batch(obs, actions, torch.randn(32), torch.randn(32, 5), torch.ones(32))
    calls = {
        "critic_loss": (agent.critic, agent.critic_target, agent.denoiser, agent.noise_schedule, batch, args),
        "qsm_loss": (agent.denoiser, agent.critic, agent.noise_schedule, batch, args),
        "ddpm_sample": (agent.denoiser, agent.noise_schedule, obs, 1.0, "x0_hat"),
    }
    for name, call in calls.items():
        explanation = torch._dynamo.explain(getattr(qsm, name))(*call)
        assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), (name, explanation.break_reasons)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sampler_on_cuda_matches_cpu(qsm):
    torch.manual_seed(0)
    den, schedule = qsm.Denoiser(5, 2, (64, 64), 5), qsm.DiffusionSchedule("vp", 5, "cuda")
    obs, x_T = torch.randn(16, 5), torch.randn(16, 2)
    cpu = qsm.ddpm_sample(den, qsm.DiffusionSchedule("vp", 5), obs, temperature=0.0, x_T=x_T)
    gpu = qsm.ddpm_sample(den.cuda(), schedule, obs.cuda(), temperature=0.0, x_T=x_T.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4)


def _graph_run(qsm, rb, indices, graphed: bool):
    """6 updates and acting steps, each under its own seed: 3 eager warm-ups, the capture, then 2 replays."""
    torch.manual_seed(0)
    args = qsm.Args(cuda=True, cudagraphs=graphed, critic_hidden_dims=(64, 64), actor_hidden_dims=(64, 64))
    args.actor_lr_decay_steps = 10  # a learning rate that visibly changes between replays
    agent = qsm.build_agent(5, 2, args, "cuda")

    def update(idx):  # as the script's: the batch is gathered inside the graph
        return qsm.train_step(agent, rb.gather(idx), args)

    def policy(obs):
        return qsm.act(agent, obs, args)

    if graphed:
        update, policy = qsm.CudaGraph(update), qsm.CudaGraph(policy)
    outputs = []
    for i, idx in enumerate(indices):
        torch.manual_seed(100 + i)
        metrics = {key: value.clone() for key, value in update(idx).items()}
        agent.actor_scheduler.step()
        metrics["action"] = policy(rb.gather(torch.tensor([i], device="cuda")).obs).clone()
        metrics["lr"] = torch.tensor(float(agent.actor_optimizer.param_groups[0]["lr"]))
        outputs.append(metrics)
    return _modules(agent), outputs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("compiled", [False, True], ids=["cudagraphs", "compile+cudagraphs"])
def test_cudagraph_updates_match_eager_on_cuda(qsm, monkeypatch, compiled, fallback_random):
    """The replayed graphs must train exactly as eager does: same parameters, metrics, actions and learning rates."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(1)
    rb = qsm.ReplayBuffer(100, 5, 2, "cuda")
    for _ in range(100):
        obs, next_obs = torch.randn(5, generator=g).numpy(), torch.randn(5, generator=g).numpy()
        action, reward = (torch.rand(2, generator=g) * 2 - 1).numpy(), torch.randn(1, generator=g).item()
        rb.add(obs, action, reward, next_obs, float(torch.rand(1, generator=g) > 0.1))
    indices = [torch.randint(0, 100, (32,), generator=g).cuda() for _ in range(6)]
    eager_modules, eager_outputs = _graph_run(qsm, rb, indices, graphed=False)
    if compiled:
        for name in ("critic_loss", "qsm_loss", "ddpm_sample"):  # what --compile does
            monkeypatch.setattr(qsm, name, torch.compile(getattr(qsm, name)))
    graph_modules, graph_outputs = _graph_run(qsm, rb, indices, graphed=True)
    for module_e, module_g in zip(eager_modules, graph_modules, strict=True):
        for p_e, p_g in zip(module_e.parameters(), module_g.parameters(), strict=True):
            torch.testing.assert_close(p_g, p_e, rtol=1e-4, atol=1e-5)
    for step, (out_e, out_g) in enumerate(zip(eager_outputs, graph_outputs, strict=True)):
        for key in out_e:
            torch.testing.assert_close(out_g[key], out_e[key], rtol=1e-4, atol=1e-5, msg=f"step {step}: {key}")
    assert eager_outputs[-1]["lr"] < eager_outputs[0]["lr"]  # the learning-rate schedule reached the graph
