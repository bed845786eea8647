"""Training: labels as the original builds them, loss and gradients against the PyTorch reference, clipping and
the optimizer against torch's, trainable sets."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from af2_jax.checkpoint import SafetensorsCheckpoint, load_original
from af2_jax.checkpoint.keymap import to_source
from af2_jax.config import SpecialTokens
from af2_jax.training.config import OptimSection
from af2_jax.training.labels import IGNORE, make_labels, pad_ids, training_text
from af2_jax.training.step import (TrainState, clip_gradients, cross_entropy, make_train_step, optimizer, path_str,
                                   split_model, text_cross_entropy)
from tests.helpers import is_layered, rel_err
from tests.reference import AF2Reference
from tests.reference.af2_torch import int16_round_trip, log_mel

T = SpecialTokens()
A, EOC, PAD, SEP, EOS = T.media, T.end_of_chunk, T.pad, T.sep, T.eos
X = IGNORE


def test_training_string():
    assert training_text("  What Is It? ", " A Dog. ") == "<audio>what is it?<SEP>a dog.<|endofchunk|><|endoftext|>"


@pytest.mark.parametrize("ids, expected", [
    # single answer: loss on the answer, EOC and the final EOS
    ([A, 11, 12, SEP, 21, 22, EOC, EOS], [X, X, X, X, 21, 22, EOC, EOS]),
    # right padding is ignored
    ([A, 11, SEP, 21, EOC, EOS, PAD, PAD], [X, X, X, 21, EOC, EOS, X, X]),
    # truncated in the answer: the trailing answer piece contributes nothing
    ([A, 11, 12, SEP, 21, 22, 23, 24], [X, X, X, X, X, X, X, X]),
    # truncated right after EOC: the EOC is kept
    ([A, 11, SEP, 21, 22, EOC], [X, X, X, 21, 22, EOC]),
    # an EOS inside the (masked) prompt keeps its label, as in the original
    ([A, 11, EOS, SEP, 21, EOC, EOS], [X, X, EOS, X, 21, EOC, EOS]),
    # two chunks: the second prompt is masked again after the first EOC
    ([A, 11, SEP, 21, EOC, A, 12, SEP, 22, EOC, EOS], [X, X, X, 21, EOC, X, X, X, 22, EOC, EOS]),
])
def test_labels_match_the_original_rule(ids, expected):
    np.testing.assert_array_equal(make_labels(np.array([ids]), T)[0], expected)


def test_labels_batch_with_padding():
    ids, mask = pad_ids([[A, 11, SEP, 21, EOC, EOS], [A, 11, 12, 13, SEP, 21, 22, EOC, EOS]], 10, PAD)
    np.testing.assert_array_equal(mask.sum(1), [6, 9])
    labels = make_labels(ids, T)
    np.testing.assert_array_equal(labels[0], [X, X, X, 21, EOC, EOS, X, X, X, X])
    np.testing.assert_array_equal(labels[1], [X, X, X, X, X, 21, 22, EOC, EOS, X])


# --- loss and gradients vs PyTorch -----------------------------------------------------------------------------
def _fixture_batch(golden):
    i = golden.inputs
    labels = make_labels(i["input_ids"], golden.config.tokens)
    return {"audio_x": i["audio_x"], "audio_x_mask": i["audio_x_mask"], "input_ids": i["input_ids"].astype(np.int32),
            "attention_mask": i["attention_mask"].astype(np.int32), "labels": labels.astype(np.int32)}


def _torch_loss_and_grads(golden, batch):
    """The reference's loss from the waveforms, and its gradients from the log-mel of those waveforms."""
    torch.set_num_threads(2)
    ref = AF2Reference(golden.raw_config)
    ref.load_original(dict(SafetensorsCheckpoint(golden.weights).items()))
    ref.eval()  # deterministic: no dropout, BatchNorm on running statistics
    t = torch.from_numpy
    b, n, s = batch["audio_x"].shape
    mel = log_mel(int16_round_trip(t(batch["audio_x"]).reshape(b * n, s))).detach()
    htsat = ref.clap.nvclap
    clap = htsat.encode_image(htsat.image(mel)).view(b, n, -1, htsat.num_features)
    media, media_mask = ref.transform_audio(clap, t(batch["audio_x_mask"]))
    logits = ref(t(batch["input_ids"]).long(), t(batch["attention_mask"]).long(), media, media_mask)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             t(batch["labels"][:, 1:]).long().reshape(-1), ignore_index=IGNORE)
    loss.backward()
    grads = {n: p.grad.numpy() for n, p in ref.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads, mel.numpy().reshape(b, n, *mel.shape[1:])


@pytest.mark.parametrize("gather", [False, True], ids=["all-positions", "labelled-positions"])
def test_loss_and_gradients_match_pytorch(golden, gather):
    """The loss end to end from the waveforms within 1e-5; every sft-trainable gradient within 1e-4 relative.

    Gradients start from the same log-mel on both sides: the front end has no parameters, and its float32 STFT
    differs between torch and XLA by up to 0.06 dB in near-silent bins (test_log_mel), which moves the gradient of
    the first layer (bn0) by about 2e-4 relative; from a shared log-mel every gradient agrees to about 2e-5."""
    batch = _fixture_batch(golden)
    labelled = (batch["labels"][:, 1:] != IGNORE).sum(1)
    loss_positions = int(labelled.max()) if gather else 0
    assert not gather or loss_positions < batch["labels"].shape[1] - 1
    torch_loss, torch_grads, mel = _torch_loss_and_grads(golden, batch)
    model = load_original(golden.weights, golden.config)
    graphdef, params, frozen = split_model(model, "sft")
    end_to_end = jax.jit(lambda p: cross_entropy(nnx.merge(graphdef, p, frozen), batch,
                                                 loss_positions=loss_positions))
    total, count = end_to_end(params)
    assert abs(float(total / count) - torch_loss) <= 1e-5 * abs(torch_loss)

    def loss_from_mel(p):
        m = nnx.merge(graphdef, p, frozen)
        media, media_mask = m.transform_audio(m.audio_encoder(mel), batch["audio_x_mask"])
        total, count = text_cross_entropy(m, media, media_mask, batch, loss_positions=loss_positions)
        return total / count

    loss, grads = jax.jit(jax.value_and_grad(loss_from_mel))(params)
    assert abs(float(loss) - torch_loss) <= 1e-5 * abs(torch_loss)
    compared = 0
    for path, grad in nnx.to_flat_state(grads):
        p = path_str(path)
        value = np.asarray(grad[...])
        slots = [(f"{p}[{i}]", value[i]) for i in range(value.shape[0])] if is_layered(p) else [(p, value)]
        for slot, ours in slots:
            name, transform = to_source(slot)
            expected = transform.to_jax(torch_grads[name])
            assert rel_err(ours, expected) <= 1e-4, (slot, rel_err(ours, expected))
            compared += 1
    # every trainable tensor of the sft set had a gradient on both sides
    assert compared == sum(1 for n in torch_grads if not n.startswith("lang_encoder.model.layers.") or
                           "gated_cross_attn" in n) - ("lang_encoder.model.norm.weight" in torch_grads)


# --- clipping and AdamW vs torch --------------------------------------------------------------------------------
# The modules the original clips each on its own (docs/original.md#clipping: src/flamingo.py wrap_fsdp), by the original
# parameter names: the audio encoder, the audio transformer, every gated cross-attention block, the embedding.
ORIGINAL_CLIP_MODULES = re.compile(r"(clap|audio_transformer_clap|lang_encoder\.model\.embed_tokens"
                                   r"|lang_encoder\.model\.layers\.\d+\.gated_cross_attn_layer_sound)\.")


def _slots(state):
    """(slot, array) for each tensor of a state; a stacked tensor gives one slot per layer, named as the keymap."""
    for path, var in nnx.to_flat_state(state):
        p, value = path_str(path), np.asarray(var[...])
        if is_layered(p):
            yield from ((f"{p}[{i}]", value[i]) for i in range(value.shape[0]))
        else:
            yield p, value


def _torch_tensors(params, dtype=np.float32):
    """Our tensors as torch parameters, and the modules the original clips, found from the original names. (Our
    layouts differ from torch's by transposes, to which norms and AdamW are blind.)"""
    tensors, modules = {}, {}
    for slot, value in _slots(params):
        name = to_source(slot)[0]
        match = ORIGINAL_CLIP_MODULES.match(name)
        assert match, f"{name} is in no module the original clips"
        tensors[slot] = torch.nn.Parameter(torch.from_numpy(value.astype(dtype)))
        modules.setdefault(match.group(1), []).append(slot)
    return tensors, modules


def _from_slots(like, slots: dict):
    """A state shaped as `like` from per-slot arrays."""
    def one(path, var):
        p = path_str(path)
        if is_layered(p):
            return var.replace(jnp.asarray(np.stack([slots[f"{p}[{i}]"] for i in range(var[...].shape[0])])))
        return var.replace(jnp.asarray(slots[p]))

    return nnx.map_state(one, like)


@pytest.mark.parametrize("trainable", ["pretrain", "sft"])
def test_per_module_clipping_and_adamw_match_torch(golden, trainable):
    """Three optimizer steps from different gradients: our per-module clipping = torch's clip_grad_norm_ over the
    modules the original clips, grouped by the original names (each step some modules above max_grad_norm, some
    below, tensors of a module at different scales); our AdamW's moments and parameters = torch.optim.AdamW's with
    its defaults (betas 0.9, 0.999, eps 1e-8) and the original's weight decay 0.1."""
    # mutation checks in af2_jax/training/step.py: clip_gradients returning `grads` unchanged for per_module (no
    # clipping) -> the clipped gradients differ (1.5 relative); clip_group putting every module but the layers' in
    # one group -> they differ (0.6); `b1=0.5, b2=0.9` in optimizer() -> the first moments differ (0.4, first step).
    model = load_original(golden.weights, golden.config)
    _, params, _ = split_model(model, trainable)
    optim = OptimSection(learning_rate=1e-2, weight_decay=0.1, max_grad_norm=1.0)
    assert optim.warmup_steps == 0  # the configured rate from the first step, as torch's
    tx = optimizer(optim, 10)

    @jax.jit
    def clip_and_step(grads, opt_state, params):
        clipped, _ = clip_gradients(grads, "per_module", optim.max_grad_norm)
        updates, opt_state = tx.update(clipped, opt_state, params)
        return clipped, optax.apply_updates(params, updates), opt_state

    tensors, modules = _torch_tensors(params)
    lm = golden.config.lm
    expected = {"audio_transformer_clap", "lang_encoder.model.embed_tokens"} | {
        f"lang_encoder.model.layers.{i}.gated_cross_attn_layer_sound"
        for i in range(0, lm.num_layers, golden.config.cross_attention.every_n_layers)}
    assert set(modules) == expected | ({"clap"} if trainable == "sft" else set())
    opt = torch.optim.AdamW(tensors.values(), lr=optim.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=0.1)
    opt_state = tx.init(params)
    rng = np.random.default_rng(0)
    scale = {}  # the largest clipped gradient of each tensor so far
    for step in range(3):
        targets = [0.4, 2.5, 0.7, 4.0]  # module norms, rotating over the modules from step to step
        raw = {slot: rng.normal(size=value.shape) * 10 ** rng.uniform(-1, 1) for slot, value in _slots(params)}
        grads = {}
        for k, (module, slots) in enumerate(sorted(modules.items())):
            norm = np.sqrt(sum(np.sum(raw[s] ** 2) for s in slots))
            grads.update({s: (raw[s] * targets[(k + step) % 4] / norm).astype(np.float32) for s in slots})
        for slot, t in tensors.items():
            t.grad = torch.from_numpy(grads[slot].copy())
        for slots in modules.values():
            torch.nn.utils.clip_grad_norm_([tensors[s] for s in slots], optim.max_grad_norm)
        ours_before = {slot: value.astype(np.float64) for slot, value in _slots(params)}
        torch_before = {slot: t.detach().numpy().astype(np.float64) for slot, t in tensors.items()}
        opt.step()
        clipped, params, opt_state = clip_and_step(_from_slots(params, grads), opt_state, params)
        mu, nu = optax.tree_utils.tree_get(opt_state, "mu"), optax.tree_utils.tree_get(opt_state, "nu")
        for (slot, g), (_, m), (_, v), (_, p) in zip(_slots(clipped), _slots(mu), _slots(nu), _slots(params)):
            t = tensors[slot]
            assert rel_err(g, t.grad.numpy()) <= 1e-6, (step, slot, "clipped gradient", rel_err(g, t.grad.numpy()))
            # The moments relative to the gradients they average (a moment can cancel to much less than its terms:
            # the first moment of a one-element gate, after three steps)
            scale[slot] = max(scale.get(slot, 0.0), float(np.abs(t.grad.numpy()).max()))
            for what, ours, theirs, unit in (("first moment", m, opt.state[t]["exp_avg"], scale[slot]),
                                             ("second moment", v, opt.state[t]["exp_avg_sq"], scale[slot] ** 2)):
                err = np.abs(np.asarray(ours, np.float64) - theirs.numpy()).max() / unit
                assert err <= 1e-6, (step, slot, what, err)
            # Each step's change of the parameters: within 2e-5 of the learning rate (an AdamW step moves an element
            # by up to about the rate) beyond two float32 spacings (each side lands up to about one spacing from the
            # exact value: 1.1522472 and 1.1522474 for 1.15224731). optax computes AdamW's bias correction
            # 1 - b2**t in float32, where 0.999 rounds to 0.99900001, so its updates at steps 1, 2, 3 are 0.7e-5,
            # 1.0e-5, 1.4e-5 (relative) smaller than torch's, which corrects in float64; the moments agree to 1e-6.
            theirs = t.detach().numpy()
            change, torch_change = np.asarray(p, np.float64) - ours_before[slot], theirs - torch_before[slot]
            excess = np.abs(change - torch_change) - 2 * np.spacing(np.abs(theirs))
            err = excess.max() / optim.learning_rate
            assert err <= 2e-5, (step, slot, "parameter change", err)


# --- the train step ---------------------------------------------------------------------------------------------
def keep_gradient():
    """An optax transformation that passes the gradient on and keeps it in its state: chained before AdamW, it
    shows the gradient the train step hands to the optimizer (after accumulation and clipping)."""
    return optax.GradientTransformation(lambda params: jax.tree.map(jnp.zeros_like, params),
                                        lambda updates, state, params=None: (updates, updates))


class _Trainer:
    """The golden model split for `pretrain`, with a jitted train step (AdamW behind `keep_gradient`) per optimizer
    config: tests that use the same config share its compilation."""

    def __init__(self, golden):
        self.graphdef, self.params, self.frozen = split_model(load_original(golden.weights, golden.config), "pretrain")
        self._steps = {}

    def step(self, batch, optim: OptimSection):
        """One optimizer step from the golden parameters: (parameters, gradient handed to AdamW, metrics)."""
        if optim not in self._steps:
            tx = optax.chain(keep_gradient(), optimizer(optim, 10))
            self._steps[optim] = tx, jax.jit(make_train_step(self.graphdef, tx, optim))
        tx, step = self._steps[optim]
        state, metrics = step(TrainState(self.params, tx.init(self.params), jnp.int32(0)), self.frozen, batch)
        assert int(state.step) == 1 and np.isfinite(float(metrics.loss))
        return state.params, state.opt_state[0], metrics


@pytest.fixture(scope="module")
def trainer(golden):
    return _Trainer(golden)


# No weight decay, no clipping: nothing but the gradient moves the parameters.
PLAIN = OptimSection(learning_rate=1e-3, weight_decay=0.0, clip="none")


def _rows(batch):
    return [jax.tree.map(lambda x: x[r:r + 1], batch) for r in range(len(batch["labels"]))]


def test_accumulated_step_equals_one_step_on_the_whole_batch(golden, trainer):
    """grad_accum=2 (a row per micro-batch) takes the step one step on both rows takes: each micro-batch's mean loss
    / grad_accum (train/README) is the batch mean when the micro-batches hold equally many labelled tokens, as here.
    No weight decay, no clipping: the gradient handed to AdamW is the sum of the rows' own gradients / 2 within 1e-6
    and the whole batch's within 1e-4: float32 gradients of this model's audio path carry 1e-5 of rounding (against
    a float64 evaluation the accumulated and the whole-batch gradients are each 1e-5 to 4e-5 off, 3.5e-5 apart).
    Parameters after AdamW are not compared: AdamW divides each element by its own magnitude (+ 1e-8), so that
    rounding noise on elements near 0 comes out as up to 1e-2 of a tensor."""
    # mutation checks in af2_jax/training/step.py: `grads = jax.tree.map(jnp.add, grads, micro_grads)` ->
    # `grads = micro_grads` (only the last micro-batch's gradient kept) -> the gradients differ (0.78 relative);
    # micro_loss without `/ accum` -> they differ (1.0).
    assert not any(path_str(p).startswith(("audio_encoder", "layers.decoder", "norm"))
                   for p, _ in nnx.to_flat_state(trainer.params))
    batch = _fixture_batch(golden)
    labelled = (batch["labels"][:, 1:] != IGNORE).sum(1)
    assert labelled[0] == labelled[1] > 0
    params, grads, metrics = trainer.step(batch, dataclasses.replace(PLAIN, grad_accum=2))
    _, whole_grads, whole_metrics = trainer.step(batch, PLAIN)
    rows = [trainer.step(row, PLAIN) for row in _rows(batch)]
    assert int(metrics.tokens) == int(whole_metrics.tokens) == labelled.sum()
    assert rel_err(metrics.loss, whole_metrics.loss) <= 1e-6
    assert rel_err(metrics.loss, np.mean([float(m.loss) for _, _, m in rows])) <= 1e-6
    row_grads = [dict(_slots(g)) for _, g, _ in rows]
    for (slot, ours), (_, whole), (_, moved), (_, before) in zip(
            _slots(grads), _slots(whole_grads), _slots(params), _slots(trainer.params)):
        assert np.abs(whole).max() > 0 and not np.array_equal(moved, before), slot  # no weight decay to move it
        expected = row_grads[0][slot] / 2 + row_grads[1][slot] / 2
        assert rel_err(ours, expected) <= 1e-6, (slot, rel_err(ours, expected))
        assert rel_err(ours, whole) <= 1e-4, (slot, rel_err(ours, whole))


def test_clip_every_microstep_matches_a_torch_loop(golden, trainer):
    """The original's loop (docs/original.md#clipping): per micro-batch, backward of its mean loss / grad_accum into the
    accumulated .grad, then clip_grad_norm_ of each module; AdamW after the last. Our grad_accum=2 step with
    clip_every_microstep against that loop in torch, fed each micro-batch's gradient (a row each, with 7 and 6
    labelled tokens, so the mean of the micro-batches' means is not the batch mean). Every module is clipped at both
    micro-steps (module norms 4 to 111)."""
    # mutation checks in af2_jax/training/step.py: `grads = jax.tree.map(jnp.add, grads, micro_grads)` ->
    # `grads = micro_grads` -> the clipped gradients differ; so they do when clipping once after the scan instead of
    # after every micro-step (`if False:` in accumulate, `if True:` after the scan), or not at all.
    batch = _fixture_batch(golden)
    batch["labels"][1, np.flatnonzero(batch["labels"][1] != IGNORE)[-1]] = IGNORE
    micro = [trainer.step(row, PLAIN)[1:] for row in _rows(batch)]
    optim = OptimSection(learning_rate=1e-3, grad_accum=2, clip="per_module", max_grad_norm=1.0,
                         clip_every_microstep=True)
    assert optim.weight_decay == 0.1
    params, grads, metrics = trainer.step(batch, optim)
    assert rel_err(metrics.loss, np.mean([float(m.loss) for _, m in micro])) <= 1e-6
    # The loop in float64: torch's float32 clip_grad_norm_ sums squares in float32, 9e-6 short on the 131072 elements
    # of a to_kv kernel here (ours is within 1e-7 of the float64 loop).
    tensors, modules = _torch_tensors(trainer.params, np.float64)
    for micro_grads, _ in micro:
        micro_grads = dict(_slots(micro_grads))
        for slot, t in tensors.items():
            g = torch.from_numpy(micro_grads[slot].astype(np.float64) / optim.grad_accum)
            t.grad = g if t.grad is None else t.grad + g
        for slots in modules.values():
            norm = torch.nn.utils.clip_grad_norm_([tensors[s] for s in slots], optim.max_grad_norm)
            assert norm > optim.max_grad_norm
    ours = dict(_slots(grads))
    for slot, t in tensors.items():  # the accumulated, clipped gradient handed to AdamW
        assert rel_err(ours[slot], t.grad.numpy()) <= 1e-6, (slot, rel_err(ours[slot], t.grad.numpy()))
    # AdamW: torch's, applied to the gradient our step handed to AdamW. (Not to torch's own: the two differ by float32
    # rounding, which AdamW, dividing each element by its own magnitude + 1e-8, turns into up to 1e-3 of the rate
    # on elements near 0.) Each parameter's change within 2e-5 of the rate beyond two float32 spacings, as in
    # test_per_module_clipping_and_adamw_match_torch.
    tensors, _ = _torch_tensors(trainer.params)
    for slot, t in tensors.items():
        t.grad = torch.from_numpy(ours[slot].copy())
    torch.optim.AdamW(tensors.values(), lr=optim.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                      weight_decay=optim.weight_decay).step()
    for slot, p in _slots(params):
        theirs = tensors[slot].detach().numpy()
        excess = np.abs(p.astype(np.float64) - theirs) - 2 * np.spacing(np.abs(theirs))
        assert excess.max() <= 2e-5 * optim.learning_rate, (slot, excess.max() / optim.learning_rate)


def test_trainable_presets_count_what_the_original_trained():
    """The original's recipe (docs/original.md#training-recipe) counts 1 745 406 024 trainable parameters for
    pretrain and 2 024 176 031 for SFT at 3B. The SFT count includes 7 918 015 HTSAT parameters that are dead in AF2's
    forward, so they never received a gradient and the port does not build them: the STFT/mel bases (1 083 456), the
    classifier head (6 754 559) and the fusion branch (80 000), counted from the 3B release's shape map (written out
    here, not recomputed by the code under test)."""
    from af2_jax.config import preset
    from af2_jax.nn.af2 import AF2Model

    abstract = nnx.eval_shape(lambda: AF2Model(preset("af2-3b"), rngs=nnx.Rngs(0)))
    count = {name: sum(x.size for x in jax.tree.leaves(split_model(abstract, name)[1])) for name in ("pretrain", "sft")}
    assert count["pretrain"] == 1_745_406_024
    assert count["sft"] == 2_024_176_031 - (1_083_456 + 6_754_559 + 80_000)
