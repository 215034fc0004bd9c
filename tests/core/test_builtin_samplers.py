"""The built-in samplers' plans: ``per_group`` draws k items of every group and stream per step,
``mixed`` k items of every stream from all groups pooled; each walks through fresh permutations
epoch by epoch, so every item is seen once per epoch, and a plan depends on (seed, step) alone."""

from __future__ import annotations

from collections import Counter

from branchadapt.builtin.samplers import MixedOptions, MixedSampler, PerGroupOptions, PerGroupSampler

SIZES = {"a": {"x": 6, "y": 4}, "b": {"x": 3, "y": 0}, "c": {"x": 5}}


def per_group(k: int, seed: int = 0) -> PerGroupSampler:
    return PerGroupSampler(PerGroupOptions(per_group=k), SIZES, seed)


def test_per_group_draws_k_items_of_every_group_and_stream():
    plan = per_group(2).plan(5)
    assert set(plan) == {"x", "y"}
    assert Counter(g for g, _ in plan["x"]) == {"a": 2, "b": 2, "c": 2}
    assert Counter(g for g, _ in plan["y"]) == {"a": 2}  # b has no y items; c has no y stream
    for stream, picks in plan.items():
        assert all(0 <= i < SIZES[g][stream] for g, i in picks)


def test_per_group_sees_every_item_once_per_epoch_and_epochs_differ():
    sampler = per_group(1)
    for group, n in (("a", 6), ("b", 3), ("c", 5)):
        seen = [i for step in range(3 * n) for g, i in sampler.plan(step)["x"] if g == group]
        epochs = [seen[e * n : (e + 1) * n] for e in range(3)]
        assert all(sorted(e) == list(range(n)) for e in epochs), (group, epochs)
        assert len({tuple(e) for e in epochs}) > 1, (group, epochs)  # a fresh permutation each epoch
    # with k items a step, step s takes items s*k .. s*k+k-1 of the same sequence
    one, three = per_group(1), per_group(3)
    sequence = [i for step in range(12) for g, i in one.plan(step)["x"] if g == "a"]
    taken = [i for step in range(4) for g, i in three.plan(step)["x"] if g == "a"]
    assert taken == sequence


def test_groups_and_streams_draw_independent_orders():
    sampler = PerGroupSampler(PerGroupOptions(per_group=1), {"p": {"x": 8, "y": 8}, "q": {"x": 8}}, 0)

    def order(group: str, stream: str) -> list[int]:
        return [i for step in range(8) for g, i in sampler.plan(step)[stream] if g == group]

    px, py, qx = order("p", "x"), order("p", "y"), order("q", "x")
    assert sorted(px) == sorted(py) == sorted(qx) == list(range(8))
    assert px != qx and px != py  # same sizes, own orders


def test_a_plan_is_a_function_of_seed_and_step_alone():
    first, again = per_group(2, seed=7), per_group(2, seed=7)
    steps = [9, 0, 4, 9]
    assert [first.plan(s) for s in steps] == [again.plan(s) for s in reversed(steps)][::-1]
    assert per_group(2, seed=7).plan(3) != per_group(2, seed=8).plan(3)


def test_mixed_draws_from_the_pooled_groups_and_sees_every_item_once_per_epoch():
    sampler = MixedSampler(MixedOptions(batch_size=2), SIZES, 0)
    pool_x = [(g, i) for g in ("a", "b", "c") for i in range(SIZES[g]["x"])]  # 14 items
    picks = [p for step in range(7) for p in sampler.plan(step)["x"]]
    assert sorted(picks) == sorted(pool_x)  # 7 steps of 2: one epoch, every pooled item once
    assert all(len(sampler.plan(step)["x"]) == 2 for step in range(7))
    y = [p for step in range(2) for p in sampler.plan(step)["y"]]
    assert sorted(y) == [("a", i) for i in range(4)]  # only a has y items
    assert MixedSampler(MixedOptions(batch_size=2), SIZES, 0).plan(3) == sampler.plan(3)
