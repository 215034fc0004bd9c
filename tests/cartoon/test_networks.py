"""The photo2cartoon networks against the reference sheet: names, shapes, counts; and branching."""

from __future__ import annotations

import pytest
import torch

import branchadapt as ba
from branchadapt import BranchedModel, Participation
from branchadapt_cartoon.critics import Discriminator, min_size
from branchadapt_cartoon.networks import UGATITGenerator
from branchadapt_cartoon.photo2cartoon import reference_key

SECTIONS = {}


@pytest.fixture(autouse=True)
def _sections(reference_sections):
    SECTIONS.update(reference_sections)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_generator_matches_the_reference_sheet_key_for_key():
    gen = UGATITGenerator(UGATITGenerator.Options(width=32, image_size=256))
    assert count(gen) == 3_831_079
    ours = {reference_key(k): tuple(v.shape) for k, v in gen.state_dict().items()}
    assert ours == SECTIONS["generator"]
    per_module = {"ConvBlock1": 4704, "HourGlass1": 105_347, "DownBlock1": 18_432, "DownBlock2": 73_728,
                  "EncodeBlock1": 294_912, "FC": 33_024, "DecodeBlock1": 493_824, "UpBlock1": 73_920,
                  "UpBlock2": 18_528, "HourGlass4": 104_163, "ConvBlock2": 441}  # fmt: skip
    for name, n in per_module.items():
        assert count(gen.get_submodule(name)) == n, name
    assert count(gen.cam) == 129 + 129 + 32_896


@pytest.mark.parametrize(("layers", "section", "params"), [(7, "global", 13_294_048), (5, "local", 826_080)])
def test_discriminators_match_the_reference_sheet(layers, section, params):
    d = Discriminator(width=32, n_layers=layers)
    assert count(d) == params
    assert {k: tuple(v.shape) for k, v in d.state_dict().items()} == SECTIONS[section]
    with_head = Discriminator(width=32, n_layers=layers, n_groups=4)
    assert count(with_head) - params == (2 * d.conv.weight_orig.shape[1] + 1) * 4


def test_forward_shapes_small_and_size_errors():
    gen = UGATITGenerator(UGATITGenerator.Options(width=8, image_size=32, n_blocks=2))
    img, cam, heat = gen(torch.randn(2, 3, 32, 32))
    assert img.shape == (2, 3, 32, 32) and cam.shape == (2, 2) and heat.shape == (2, 1, 8, 8)
    assert img.abs().max() <= 1
    d = Discriminator(width=8, n_layers=4, n_groups=3)(torch.randn(2, 3, 32, 32))
    assert d.patch.shape == (2, 1, 6, 6) and d.cam_logit.shape == (2, 2) and d.group_logits.shape == (2, 3)
    with pytest.raises(ba.UserError, match=r"at least 96 px.*lower task\.global_layers"):  # exit 2 in a run
        Discriminator(width=8, n_layers=7)(torch.randn(1, 3, 64, 64))
    assert min_size(7) == 96
    with pytest.raises(ValueError, match="multiple of 16"):
        UGATITGenerator.Options(image_size=40)
    with pytest.raises(ValueError, match="greater than or equal to 32"):
        UGATITGenerator.Options(image_size=16)  # 1 px at the deepest level: reflection pad fails
    with pytest.raises(ValueError, match="at least 32"):
        gen(torch.randn(1, 3, 16, 16))


def test_images_of_another_size_than_model_image_size_are_a_user_error_in_training():
    light = UGATITGenerator(UGATITGenerator.Options(width=4, image_size=64, n_blocks=1))
    with pytest.raises(ba.UserError, match=r"model\.image_size is 64 but the images are 32x32 px"):
        light(torch.randn(1, 3, 32, 32))  # training: it would export and report the wrong size
    with torch.no_grad():
        assert light(torch.randn(1, 3, 32, 32))[0].shape == (1, 3, 32, 32)  # a light model's inference
    full = UGATITGenerator(UGATITGenerator.Options(width=4, image_size=64, n_blocks=1, light=False))
    with torch.no_grad(), pytest.raises(ba.UserError, match=r"set model\.image_size to the data.s size"):
        full(torch.randn(1, 3, 32, 32))  # its FC layer is sized for 64 px


def test_weights_are_initialised_from_n_0_002():
    gen = UGATITGenerator(UGATITGenerator.Options(width=32, image_size=256))
    w = gen.DecodeBlock1.conv1.weight.detach()
    assert abs(float(w.mean())) < 1e-3 and float(w.std()) == pytest.approx(0.02, rel=0.05)
    assert float(gen.DecodeBlock1.norm1.norm.rho.detach().mean()) == pytest.approx(0.9)
    assert (
        float(gen.UpBlock1[3].rho.detach().abs().sum()) == 0.0
        and float(gen.DecodeBlock1.norm1.w_gamma.detach().abs().sum()) == 0.0
    )


def test_selective_bp_on_the_real_generator_and_depth_is_one_number():
    torch.manual_seed(0)
    opts = UGATITGenerator.Options(width=8, image_size=32, n_blocks=1)
    plain = UGATITGenerator(opts)
    x = torch.randn(1, 3, 32, 32)
    expected = plain(x)[0]
    names = plain.stage_names()
    model = BranchedModel(plain, ("anchor", "few"), names[:2] + names[-2:],
                          {"anchor": Participation.LIVE, "few": Participation.DETACHED})  # fmt: skip
    for gid in (0, 1):  # branches start as copies: outputs unchanged for every group
        assert torch.allclose(model(x, groups=[gid])[0], expected, atol=1e-6)
    model(x, groups=[1])[0].abs().mean().backward()
    assert all(p.grad is None or not p.grad.any() for p in model.shared_parameters())
    # every branch stage of the few-shot group learns (ConvBlock4 units are unused, as in the reference)
    for stage in names[:2] + names[-2:]:
        branch = model.backbone.get_submodule(stage).branches["few"]
        assert sum(float(p.grad.abs().sum()) for p in branch.parameters() if p.grad is not None) > 0, stage
    assert all(p.grad is None for p in model.branch_parameters("anchor"))
    model.zero_grad(set_to_none=True)
    model(x, groups=[0])[0].abs().mean().backward()
    assert sum(float(p.grad.abs().sum()) for p in model.shared_parameters() if p.grad is not None) > 0
    # split depth is one number: low=k puts exactly the first k stages in branches
    for low in (1, 3):
        net = ba.branch(UGATITGenerator(opts), ["anchor", "few"], splitter="selective_detach", low=low, top=0)
        branched = {
            k.split(".branches.")[0].removeprefix("backbone.") for k in net.state_dict() if ".branches." in k
        }
        assert branched == set(names[:low])


def _two_pass_lin(x, rho, eps=1e-5):
    """The reference's formulation: separate IN and LN statistics, then the rho mix."""
    in_mean, in_var = x.mean(dim=(2, 3), keepdim=True), x.var(dim=(2, 3), keepdim=True)
    ln_mean, ln_var = x.mean(dim=(1, 2, 3), keepdim=True), x.var(dim=(1, 2, 3), keepdim=True)
    out_in = (x - in_mean) / torch.sqrt(in_var + eps)
    out_ln = (x - ln_mean) / torch.sqrt(ln_var + eps)
    return rho * out_in + (1 - rho) * out_ln


def test_fused_layer_instance_norms_equal_the_two_pass_formula_in_value_and_gradient():
    from branchadapt_cartoon.networks import LIN, AdaLIN

    torch.manual_seed(0)
    # channels with very different means and scales: layer statistics derived from the instance
    # ones must not lose precision (no E[x^2] - E[x]^2 cancellation)
    shape = (2, 6, 5, 7)
    x = (torch.randn(shape, dtype=torch.float64) * torch.tensor([0.01, 1, 3, 10, 0.5, 2]).view(1, 6, 1, 1)
         + torch.tensor([100.0, -3, 0, 7, 50, -20]).view(1, 6, 1, 1)).requires_grad_()  # fmt: skip
    gamma, beta = torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    ada = AdaLIN(6).double()
    lin = LIN(6).double()
    with torch.no_grad():
        ada.rho.copy_(torch.rand_like(ada.rho))
        lin.rho.copy_(torch.rand_like(lin.rho))
        lin.gamma.copy_(torch.randn_like(lin.gamma))
        lin.beta.copy_(torch.randn_like(lin.beta))
    upstream = torch.randn(shape, dtype=torch.float64)
    cases = [
        (ada(x, gamma, beta), _two_pass_lin(x, ada.rho) * gamma[:, :, None, None] + beta[:, :, None, None], ada.rho),
        (lin(x), _two_pass_lin(x, lin.rho) * lin.gamma + lin.beta, lin.rho),
    ]  # fmt: skip
    for fused, direct, rho in cases:
        torch.testing.assert_close(fused, direct, rtol=1e-10, atol=1e-10)
        g_fused = torch.autograd.grad((fused * upstream).sum(), (x, rho))
        g_direct = torch.autograd.grad((direct * upstream).sum(), (x, rho))
        for a, b in zip(g_fused, g_direct, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


def test_instance_norm_is_torchs_in_value_and_gradient_but_not_a_view():
    from branchadapt_cartoon.networks import InstanceNorm

    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, 7, dtype=torch.float64) * 3 + 1
    upstream = torch.randn_like(x)
    results = []
    for norm in (torch.nn.InstanceNorm2d(5), InstanceNorm(5)):
        xi = x.clone().requires_grad_()
        out = norm(xi)
        results.append((out._base, torch.relu_(out)))  # the in-place ReLU that follows it in the nets
        results[-1] += torch.autograd.grad((out * upstream).sum(), xi)
    (torch_base, torch_out, torch_grad), (our_base, our_out, our_grad) = results
    assert torch_base is not None and our_base is None  # torch's is a view (CopySlices in backward)
    torch.testing.assert_close(our_out, torch_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(our_grad, torch_grad, rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # inference takes torch's own path
        torch.testing.assert_close(InstanceNorm(5)(x), torch.nn.InstanceNorm2d(5)(x))
    gen = UGATITGenerator(UGATITGenerator.Options(width=8, image_size=32))
    assert not any(type(m) is torch.nn.InstanceNorm2d for m in gen.modules())


def test_the_generators_branch_stages_run_stacked_with_the_loops_gradients():
    import copy
    import warnings

    torch.manual_seed(0)
    options = UGATITGenerator.Options(width=8, image_size=32, n_blocks=1, low_memory_min_mb=0)
    plain = UGATITGenerator(options)  # every unit on its low-memory path (and its vmap rule)
    names = plain.stage_names()
    groups = ("anchor", "b", "c", "d")
    policy = {g: Participation.DETACHED for g in groups[1:]}
    loop = BranchedModel(plain, groups, names[:2] + names[-2:], policy)
    with torch.no_grad():
        for p in loop.branch_parameters():
            p.mul_(1 + 0.1 * torch.randn_like(p))  # the groups' copies differ
    stacked = copy.deepcopy(loop)
    stacked.stacked = True
    x = torch.randn(8, 3, 32, 32)
    ids = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    outs, saved = {}, {}
    for name, model in (("loop", loop), ("stacked", stacked)):
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor, storages: dict[int, int] = storages) -> torch.Tensor:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with warnings.catch_warnings(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            warnings.simplefilter("error")  # every branch stage maps: no fallback to the loop
            img, cam, _ = model(x, groups=ids)
        (img.square().mean() + cam.square().mean()).backward()
        outs[name], saved[name] = img.detach(), sum(storages.values())
    torch.testing.assert_close(outs["stacked"], outs["loop"], rtol=1e-4, atol=1e-5)
    # the low-memory units keep only their inputs under vmap too (plain, they kept 1.3x the loop's)
    assert saved["stacked"] < 1.1 * saved["loop"], saved
    pairs = [
        (n, p.grad, q.grad) for (n, p), q in zip(loop.named_parameters(), stacked.parameters(), strict=True)
    ]
    assert all((a is None) == (b is None) for _, a, b in pairs)  # the same parameters learn
    scale = max(float(a.abs().max()) for _, a, _ in pairs if a is not None)
    for name, a, b in pairs:
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4 * scale, msg=name)


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize(
    "ids",
    [
        [1, 0, 2, 3, 3, 2, 0, 1],  # two rows each (the paper's batch)
        [1, 0, 1, 3, 1, 2, 2, 3],  # one anchor row, three of b: a branch copy sees more rows than live
    ],
)
def test_the_generator_runs_live_and_detached_groups_in_one_call_with_the_same_gradients(stacked, ids):
    import copy
    import warnings

    torch.manual_seed(0)
    options = UGATITGenerator.Options(width=8, image_size=32, n_blocks=1, low_memory_min_mb=0)
    plain = UGATITGenerator(options).double()  # low-memory units: they cooperate with the live rows
    names = plain.stage_names()
    groups = ("anchor", "b", "c", "d")
    policy = {g: Participation.DETACHED for g in groups[1:]}
    split = BranchedModel(plain, groups, names[:2] + names[-2:], policy)
    with torch.no_grad():
        for p in split.branch_parameters():
            p.mul_(1 + 0.1 * torch.randn_like(p))
    fused = copy.deepcopy(split)
    fused.fused, fused.stacked = True, stacked

    def no_split_path(*args, **kwargs):
        raise AssertionError("the fused model ran the groups as separate calls")

    fused._run = no_split_path
    x = torch.randn(8, 3, 32, 32, dtype=torch.double)
    ids = torch.tensor(ids)
    outs = {}
    for name, model in (("split", split), ("fused", fused)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # every shared operation is restricted: no fallback
            img, cam, heat = model(x, groups=ids)
        (img.square().mean() + cam.square().mean() + heat.mean()).backward()
        outs[name] = (img.detach(), cam.detach())
    for got, want in zip(outs["fused"], outs["split"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    for (name, p), q in zip(split.named_parameters(), fused.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-7, atol=1e-10, msg=name)


@pytest.mark.usefixtures("own_kernels_on_small_maps")  # the norms' and pads' own channels_last paths
def test_channels_last_activations_give_the_same_values_and_gradients():
    torch.manual_seed(0)
    opts = {"width": 8, "image_size": 32, "n_blocks": 1, "low_memory_min_mb": 0}
    plain = UGATITGenerator(UGATITGenerator.Options(**opts)).double()
    cl = UGATITGenerator(UGATITGenerator.Options(**opts, channels_last=True)).double()
    cl.load_state_dict(plain.state_dict())
    layouts: list[bool] = []
    cl.HourGlass3.register_forward_pre_hook(
        lambda m, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    outs = []
    for gen in (plain, cl):
        img, cam, heat = gen(x)
        (img.square().sum() + cam.sum() + heat.sum()).backward()
        outs.append((img, cam, heat, {n: p.grad for n, p in gen.named_parameters()}))
    assert layouts == [True] and not outs[0][0].is_contiguous(memory_format=torch.channels_last)
    assert outs[1][0].is_contiguous() and outs[1][2].is_contiguous()  # outputs back in the default layout
    for a, b in zip(outs[0][:3], outs[1][:3], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-10)
    for name, grad in outs[0][3].items():
        torch.testing.assert_close(outs[1][3][name], grad, rtol=1e-7, atol=1e-10, msg=name)
    with torch.no_grad():  # inference keeps the default layout (export, sampling)
        layouts.clear()
        cl(x)
        assert layouts == [False]


def test_channels_last_auto_is_for_large_cpu_training_inputs():
    gen = UGATITGenerator(UGATITGenerator.Options(width=4, image_size=32))
    assert gen.options.channels_last == "auto"
    large, small = torch.zeros(1, 3, 128, 128), torch.zeros(1, 3, 64, 64)
    assert gen._channels_last(large) and gen._channels_last(torch.zeros(1, 3, 256, 256))
    assert not gen._channels_last(small) and not gen._channels_last(torch.zeros(1, 3, 128, 96))
    with torch.no_grad():
        assert not gen._channels_last(large)  # inference keeps the default layout
    off = UGATITGenerator(UGATITGenerator.Options(width=4, image_size=32, channels_last=False))
    on = UGATITGenerator(UGATITGenerator.Options(width=4, image_size=32, channels_last=True))
    assert not off._channels_last(large) and on._channels_last(small)
