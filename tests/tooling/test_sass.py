"""The budgets on the kernels' sm_90 SASS, with no GPU (perf/_sass.py,
run by tests/tooling/ptx_probe.py): hot-loop instructions per element for every
autotune candidate, no spills, and the SFU doing the transcendentals."""

from ptx_probe import VARIANTS, Variant, rows, rows_of


def test_every_candidate_meets_its_budget():
    checked = 0
    for r in rows():
        if r["budget_sass_per_elem"] is not None:
            checked += 1
            assert r["sass_per_elem"] <= r["budget_sass_per_elem"], r
    # the forward (2 dtypes, int64), backward (2), weighted forward (2 class
    # counts), focal (hard forward and backward, soft in 2 dtypes, class indices)
    assert checked >= 12 * 5


def test_no_spills_or_local_memory():
    for r in rows():
        assert r["spill_bytes"] == 0 and r["stack_bytes"] == 0 and r["ptx_local"] == 0, r


def test_hot_loop_is_the_unmasked_block_loop():
    # Found in every build, and it moves whole 16-byte vectors: at least one
    # per 8 bf16 logits or 4 float32 ones per thread and iteration.
    for r in rows():
        assert r["loop_sass"] > 0, r
        elem_bytes = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}[r["logits"]]
        assert r["loop_ldg128"] >= r["elems_per_thread"] * elem_bytes / 16, r


def test_transcendentals_are_sfu_instructions():
    # float32: one ex2 and two reciprocals per element in the forward (exp,
    # sigmoid, log1p), two in a backward that needs no log; no libdevice log.
    # (ptxas may recompute an ex2 rather than keep it live: a few more.)
    for r in rows():
        if r["logits"] == "fp64" or r["kernel"] == "scale" or r["variant"].endswith(FOCAL_SUFFIXES):
            continue
        # (a forward with no gradient: exp and log1p's reciprocal only)
        want = 3 if r["kernel"] == "fwd" and r["grads"] else 2
        assert want <= r["mufu_per_elem"] < want + 0.5, r


FOCAL_SUFFIXES = ("focal=hard", "focal=soft")


def test_focal_factor_costs_one_sfu_exp_with_hard_labels():
    # The focal forward with hard labels takes the plain forward's
    # three SFU instructions plus one (the exp of gamma log(1 - p_t)), within
    # the plain budget plus 15 SASS/element; its backward also needs the
    # loss itself, so log1p's reciprocal too: 2 + 2.
    plain = {(r["BLOCK"], r["num_warps"]): r for r in rows_of(Variant("fwd", "bf16", "u8"))}
    for r in rows_of(Variant("fwd", "bf16", "u8", focal="hard")):
        assert 4 <= r["mufu_per_elem"] < 4.5, r
        assert r["sass_per_elem"] <= r["budget_sass_per_elem"] == 55, r
        assert r["sass_per_elem"] - plain[r["BLOCK"], r["num_warps"]]["sass_per_elem"] <= 25, r
    for r in rows_of(Variant("bwd", "bf16", "u8", reduction="none", focal="hard")):
        assert 4 <= r["mufu_per_elem"] < 4.5 and r["sass_per_elem"] <= r["budget_sass_per_elem"], r


def test_focal_factor_with_soft_labels_costs_two_sfu_instructions():
    # The focal loss is allowed one SFU instruction more; soft labels need two, and no
    # fewer (_math.focal_soft_labels): 1 - p_t = sigmoid(|x|) ((1 - y) + y e)
    # is a sum weighted by the label, so log(1 - p_t) is no function of the
    # cross entropy's terms and takes the SFU's lg2, and (1 - p_t)^(gamma - 1)
    # its ex2. No reciprocal: 3 + 2. Within what keeps pace with copy
    # bandwidth at 6 bytes per element (perf/_sass.py budget): about the
    # plain budget plus 15, plus 4 for the lanes where y = 1 and the floor
    # under lg2's argument.
    for variant in (Variant("fwd", "bf16", "bf16", focal="soft"), Variant("fwd", "fp32", "fp32", focal="soft")):
        for r in rows_of(variant):
            assert 5 <= r["mufu_per_elem"] < 5.5, r
            assert r["sass_per_elem"] <= r["budget_sass_per_elem"] < 59.5, r


def test_focal_class_indices_cost_what_hard_labels_do():
    # Class indices are stepped per chunk like a per-class weight: no
    # integer division per element, so the hard labels' budget and SFU count.
    for r in rows_of(Variant("fwd", "bf16", "index", focal="hard")):
        assert 4 <= r["mufu_per_elem"] < 4.5, r
        assert r["sass_per_elem"] <= r["budget_sass_per_elem"] == 55, r


def test_per_class_weights_are_vector_loads():
    # Classes a multiple of 8: the weight and pos_weight of a thread's 8
    # elements are two 16-byte loads each, beside one of bf16 logits.
    for r in rows_of(Variant("fwd", "bf16", "u8", "class", "class")):
        assert r["loop_ldg128"] >= r["elems_per_thread"] / 8 * (1 + 2 + 2), r


def test_float64_stays_float64():
    for r in rows():
        if r["logits"] == "fp64":
            assert r["loop_f64"] > 0 and r["ptx_f64"] > 0, r
        else:
            assert r["ptx_f64"] == 0, r


def test_every_probed_variant_compiled():
    assert {r["variant"] for r in rows()} == {v.name for v in VARIANTS}
