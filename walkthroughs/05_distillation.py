# %% [markdown]
# # 5. Knowledge distillation: soft and hard
#
# A small **student** learns from a large **teacher** instead of (or besides) the data.
#
# - **Soft** distillation (Hinton et al. 2015): at every position the student matches the teacher's
#   whole next-token distribution, softened by a temperature T: minimize
#   `T^2 * KL(p_teacher,T || q_student,T)`. Borkar et al. (2026) use forward KL at T = 2, with no
#   cross-entropy term.
# - **Hard**, sequence-level distillation (Kim & Rush 2016, who train on the teacher's beam-search
#   output): here, as in the paper, the teacher continues each training example's prefix greedily,
#   and the student trains with plain cross-entropy on those generations.
#
# We build the divergence by hand and check it against `distill.py`, see numerically why the loss is
# multiplied by T^2, fit a one-peaked student to a two-peaked teacher with forward and reverse KL, and
# check that hard distillation's data is the teacher's greedy decoding. A few seconds.

# %%
import lesson  # first: it puts the project's files (model.py, train.py, ...) on the path


import numpy as np
import torch

import distill
from model import ModelArgs, Transformer

check = lesson.Checks("05")
torch.manual_seed(0)

# %% [markdown]
# ## The divergence, by hand
#
# p = softmax(teacher logits / T), q = softmax(student logits / T), and
# KL(p || q) = sum_v p_v (log p_v - log q_v), per position.

# %%
teacher_logits, student_logits = 3 * torch.randn(6, 50), 3 * torch.randn(6, 50)


def forward_kl(student, teacher, T):
    p, log_p, log_q = (teacher / T).softmax(-1), (teacher / T).log_softmax(-1), (student / T).log_softmax(-1)
    return (p * (log_p - log_q)).sum(-1)


for T in (1.0, 2.0, 4.0):
    check.close(f"KL(p || q) at T = {T:g} by hand equals distill.divergence",
                forward_kl(student_logits, teacher_logits, T), distill.divergence(student_logits, teacher_logits, "forward_kl", T))
check("the divergence is zero when the student is the teacher",
      distill.divergence(teacher_logits, teacher_logits, "forward_kl", 2.0).abs().max() < 1e-6)

# %% [markdown]
# ## Why T^2
#
# The gradient of KL(p_T || q_T) with respect to the student's logits is (q_T - p_T) / T. As T grows
# both distributions flatten and their difference shrinks like 1/T too, so the gradient shrinks like
# 1/T^2. Multiplying the loss by T^2 keeps the gradient's size independent of T, so that changing T
# (or mixing in cross-entropy) does not silently change the learning rate.

# %%
norms = {}
for T in (1.0, 2.0, 4.0, 8.0, 16.0):
    z = student_logits.clone().requires_grad_()
    (grad,) = torch.autograd.grad(forward_kl(z, teacher_logits, T).mean(), z)
    check.close(f"at T = {T:g} the gradient is (q - p) / T per position",
                grad, ((z / T).softmax(-1) - (teacher_logits / T).softmax(-1)).detach() / T / len(z), rtol=1e-4, atol=1e-7)
    norms[T] = grad.norm().item()
print("T:                    " + "  ".join(f"{T:>8g}" for T in norms))
print("|grad| of KL:         " + "  ".join(f"{n:8.2e}" for n in norms.values()))
print("|grad| of T^2 * KL:   " + "  ".join(f"{n * T * T:8.2e}" for T, n in norms.items()))
check("without T^2 the gradient shrinks about 4x from T = 8 to T = 16", 3.5 < norms[8.0] / norms[16.0] < 4.5)
check("with T^2 it stays within 15%", abs(norms[16.0] * 256 / (norms[8.0] * 64) - 1) < 0.15)

# %% [markdown]
# `distill.py` computes the loss over a (tokens, vocabulary) matrix chunk by chunk, in fp32, and forms
# each chunk's gradient at once, so that no full matrix of logits is ever alive (Llama 3's vocabulary
# has 128,256 entries). The result is `mean over tokens of T^2 * KL`:

# %%
hidden, weight = torch.randn(12, 16, requires_grad=True), torch.randn(50, 16, requires_grad=True)
t_hidden, t_weight = torch.randn(12, 16), torch.randn(50, 16)
targets = torch.randint(0, 50, (12,))
opts = dict(divergence="forward_kl", temperature=2.0, beta=0.5, alpha=1.0, chunk=5)
loss, stats = distill.distillation_loss(hidden, weight, t_hidden, t_weight, targets, opts)
by_hand = 4.0 * forward_kl(hidden @ weight.T, t_hidden @ t_weight.T, 2.0).mean()
check.close("the chunked distillation loss is T^2 times the mean KL", loss, by_hand)
g_chunked = torch.autograd.grad(loss, (hidden, weight))
g_hand = torch.autograd.grad(by_hand, (hidden, weight))
check.close("... with the same gradient", torch.cat([g.flatten() for g in g_chunked]),
            torch.cat([g.flatten() for g in g_hand]), rtol=1e-4, atol=1e-6)

# %% [markdown]
# ## Forward or reverse KL: covering the modes, or picking one
#
# A teacher whose distribution has two peaks, and a student that can only make one (a bell-shaped
# distribution over 100 tokens, with a learned centre and width), started narrow at token 65.
# Minimizing **forward** KL(p || q) makes q put mass wherever p has it: the student spreads over both
# peaks. **Reverse** KL(q || p) punishes q for putting mass where p has none: the student picks one
# peak and leaves the other uncovered.

# %%
import matplotlib.pyplot as plt  # noqa: E402

x = torch.arange(100).float()
teacher = torch.logsumexp(torch.stack([-(x - 25) ** 2 / 50, -(x - 75) ** 2 / 50]), 0)  # two peaks, logits


def fit(kind, start=65.0, log_width=1.6, steps=3000):
    """Gradient descent on the student's centre and log-width, from a bell at `start` (width e^1.6)."""
    centre, log_width = torch.tensor(start, requires_grad=True), torch.tensor(log_width, requires_grad=True)
    optimizer = torch.optim.Adam([centre, log_width], lr=0.1)
    for _ in range(steps):
        student = -(x - centre) ** 2 / (2 * log_width.exp() ** 2)
        loss = distill.divergence(student[None], teacher[None], kind)[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return student.detach(), centre.item(), log_width.exp().item()


fits = {kind: fit(kind) for kind in ("forward_kl", "reverse_kl")}
fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(x, teacher.softmax(0), "k", label="teacher")
for kind, (student, centre, width) in fits.items():
    ax.plot(x, student.softmax(0), label=f"student, {kind.replace('_', ' ')} (centre {centre:.0f}, width {width:.0f})")
ax.set(xlabel="token", ylabel="probability", title="one peak fitted to two")
ax.legend(fontsize=8)
lesson.save_figure(fig, "05_forward_reverse_kl")
check("forward KL spreads the student over both peaks", 30 < fits["forward_kl"][1] < 70 and fits["forward_kl"][2] > 20)
check("reverse KL puts it on one peak, as narrow as the peak", abs(fits["reverse_kl"][1] - 75) < 2
      and fits["reverse_kl"][2] < 6)

# %% [markdown]
# ## Hard distillation: training on what the teacher would say
#
# The teacher continues BOS plus the first P tokens of each training example greedily, to the
# example's length; the student's training data is these continuations. At every position the
# student sees a single token, the teacher's most likely one, where soft distillation shows it the
# teacher's whole distribution. `memorize.py` prompts the models the same way (BOS + P tokens), so an
# example the teacher has memorized comes out of it word for word, and the hard student is trained
# on exactly that text.

# %%
args = ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=60, multiple_of=16, max_seq_len=32)
tiny_teacher = Transformer(args)
tiny_teacher.init_weights()
tiny_teacher.eval()
rows = np.random.default_rng(0).integers(0, 60, (5, 17))
prompt = 1 + 6  # the first 7 tokens: BOS and 6 in real examples (random ones here)
generations = distill.teacher_continuations(tiny_teacher, rows, prompt, batch_size=2, device="cpu", progress=False)
greedy = tiny_teacher.generate(torch.from_numpy(rows[:, :prompt]), 17 - prompt).numpy()
check("the prompts are kept", (generations[:, :prompt] == rows[:, :prompt]).all())
check("the rest is the teacher's greedy decoding (model.generate)", (generations[:, prompt:] == greedy).all())
with torch.no_grad():
    p = tiny_teacher(torch.from_numpy(generations[:, :-1])).softmax(-1)[:, prompt - 1:]
entropy = -(p * p.log()).sum(-1).mean().item()
print(f"the (untrained) teacher's distributions there hold {entropy:.2f} nats of uncertainty on average; "
      f"the hard student's one-hot targets hold none")
check("the continuation is at every position the teacher's most likely token",
      (p.argmax(-1).numpy() == generations[:, prompt:]).all())

check.done()

# %% [markdown]
# ## Exercises
#
# 1. Fit the one-peaked student with `distill.divergence(..., "jsd", beta=0.5)`, the generalized
#    Jensen-Shannon divergence, half way between the two KLs. Where does it land? Check whether its
#    width is closer to the forward fit's or to the reverse fit's.
# 2. With `alpha=0.5` in `opts`, the loss is half T^2 KL and half cross-entropy on `targets`. Check
#    (with `import torch.nn.functional as F`):
#    `torch.allclose(loss, 0.5 * by_hand + 0.5 * F.cross_entropy(hidden @ weight.T, targets))`.
# 3. Start the reverse-KL fit at `start=35.0`. Check that it now lands on the other peak (near 25):
#    which mode reverse KL picks depends on where it starts. Then start it wide (`log_width=3.0`):
#    check that it stays between the peaks, wide, at a divergence well above the one-peak fits'
#    (`distill.divergence` of the result): reverse KL's landscape has several valleys, and gradient
#    descent ends in the one it starts near.
#
# Next: [06_memorization.py](06_memorization.py).
