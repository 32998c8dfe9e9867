"""Spec validation (TOML and dataclasses), schedule choice and semantic hashing.

Every rejected spec must raise SpecError (or ScheduleError) with a message that names the key at
fault, so a user can fix a typo from the message alone.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest

from dsagen.ops import get_op, semantic_hash
import dsagen
from dsagen import AttentionSpec, IndexerSpec, ScheduleError, Spec, SpecError, TopKSpec
from dsagen.gpus import get_gpu
from dsagen.plan import problem_symbols
from dsagen.schedule import choose, load_space
from dsagen.ops import stages

ROOT = Path(__file__).resolve().parent.parent
V32 = ROOT / "specs" / "deepseek_v32.toml"
STAGES = stages()  # the three DSA stages, in pipeline order
H200 = get_gpu("nvidia-h200")


def v32_dict() -> dict:
    """The shipped V3.2 spec as the parsed-TOML dict spec_from_dict takes (a fresh copy per call)."""
    return copy.deepcopy({
        "name": "deepseek-v3.2",
        "indexer": {"heads": 64, "head_dim": 128, "dtype": "fp8_e4m3"},
        "topk": {"k": 2048},
        "attention": {"heads": 128, "qk_dim": 576, "v_dim": 512, "dtype": "bf16", "sm_scale": 0.13523},
    })


def with_value(section: str, key: str, value) -> dict:
    data = v32_dict()
    data[section][key] = value
    return data


def small_spec(**attention) -> Spec:
    fields = {"heads": 3, "qk_dim": 80, "v_dim": 48} | attention
    return Spec(indexer=IndexerSpec(heads=3, head_dim=50, dtype="bf16"), topk=TopKSpec(k=7),
                attention=AttentionSpec(**fields))


# ------------------------------------------------------------------------------------------------
# the shipped spec

def test_shipped_v32_spec_loads_with_expected_values():
    spec = dsagen.load_spec(V32)
    assert spec.name == "deepseek-v3.2"
    assert spec.indexer == IndexerSpec(heads=64, head_dim=128, dtype="fp8_e4m3")
    assert spec.topk == TopKSpec(k=2048)
    assert spec.attention == AttentionSpec(heads=128, qk_dim=576, v_dim=512, dtype="bf16", sm_scale=0.13523)
    assert spec.attention.rope_dim == 64
    assert spec.attention.softmax_scale == pytest.approx(0.13523)
    assert dict(spec.schedule) == {}


def test_shipped_spec_equals_the_same_dict_and_accepts_str_path():
    assert dsagen.load_spec(str(V32)) == dsagen.spec_from_dict(v32_dict())


def test_dataclass_defaults_are_the_v32_shapes():
    spec = Spec()
    assert (spec.indexer.heads, spec.indexer.head_dim, spec.indexer.dtype) == (64, 128, "fp8_e4m3")
    assert spec.topk.k == 2048
    assert (spec.attention.heads, spec.attention.qk_dim, spec.attention.v_dim) == (128, 576, 512)
    assert spec.attention.sm_scale is None
    assert spec.attention.softmax_scale == pytest.approx(576 ** -0.5)


def test_optional_keys_may_be_left_out():
    data = v32_dict()
    del data["name"]
    del data["attention"]["sm_scale"]
    spec = dsagen.spec_from_dict(data)
    assert spec.name == "unnamed"
    assert spec.attention.sm_scale is None


def test_pinned_schedule_is_kept():
    data = v32_dict() | {"schedule": {"sparse_attention": {"block_h": 32, "block_n": 64}}}
    spec = dsagen.spec_from_dict(data)
    assert spec.pinned("sparse_attention") == {"block_h": 32, "block_n": 64}
    assert spec.pinned("indexer") == {}


# ------------------------------------------------------------------------------------------------
# structure: unknown, missing, wrong shape

def test_unknown_top_level_key_is_named():
    data = v32_dict() | {"attenton": {"heads": 1}}
    with pytest.raises(SpecError, match="unknown key 'attenton'") as info:
        dsagen.spec_from_dict(data)
    assert "attention" in str(info.value)  # lists what is allowed


@pytest.mark.parametrize("section,typo", [
    pytest.param("indexer", "haeds", id="indexer.haeds"),
    pytest.param("topk", "kk", id="topk.kk"),
    pytest.param("attention", "smscale", id="attention.smscale"),
])
def test_unknown_section_key_is_named(section, typo):
    data = v32_dict()
    data[section][typo] = 1
    with pytest.raises(SpecError, match=rf"unknown key {section}\.{typo}: allowed keys are"):
        dsagen.spec_from_dict(data)


@pytest.mark.parametrize("section", ["indexer", "topk", "attention"])
def test_missing_section_is_named(section):
    data = v32_dict()
    del data[section]
    with pytest.raises(SpecError, match=rf"missing section \[{section}\]"):
        dsagen.spec_from_dict(data)


@pytest.mark.parametrize("section,key", [
    pytest.param("indexer", "heads", id="indexer.heads"),
    pytest.param("indexer", "dtype", id="indexer.dtype"),
    pytest.param("topk", "k", id="topk.k"),
    pytest.param("attention", "v_dim", id="attention.v_dim"),
])
def test_missing_key_is_named(section, key):
    data = v32_dict()
    del data[section][key]
    with pytest.raises(SpecError, match=rf"missing key {section}\.{key}$"):
        dsagen.spec_from_dict(data)


def test_section_that_is_not_a_table():
    with pytest.raises(SpecError, match=r"topk must be a table \[topk\]"):
        dsagen.spec_from_dict(v32_dict() | {"topk": 2048})


def test_spec_that_is_not_a_table():
    with pytest.raises(SpecError, match="must be a TOML table"):
        dsagen.spec_from_dict([("topk", 1)])


@pytest.mark.parametrize("name", [pytest.param("", id="empty"), pytest.param(3, id="int")])
def test_bad_name(name):
    with pytest.raises(SpecError, match="name=.* must be a non-empty string"):
        dsagen.spec_from_dict(v32_dict() | {"name": name})


# ------------------------------------------------------------------------------------------------
# wrong types

@pytest.mark.parametrize("section,key,value,message", [
    pytest.param("indexer", "heads", "64", "indexer.heads='64' must be an integer", id="str-heads"),
    pytest.param("attention", "heads", "128", "attention.heads='128' must be an integer", id="str-attn-heads"),
    pytest.param("topk", "k", True, "topk.k=True must be an integer", id="bool-k"),
    pytest.param("indexer", "head_dim", 128.0, "indexer.head_dim=128.0 must be an integer", id="float-head_dim"),
    pytest.param("attention", "qk_dim", 576.5, "attention.qk_dim=576.5 must be an integer", id="float-qk_dim"),
    pytest.param("indexer", "dtype", 8, "indexer.dtype=8 is not supported", id="int-dtype"),
    pytest.param("attention", "sm_scale", "0.1", "attention.sm_scale='0.1' must be a finite number > 0",
                 id="str-sm_scale"),
    pytest.param("attention", "sm_scale", True, "attention.sm_scale=True must be a finite number > 0",
                 id="bool-sm_scale"),
])
def test_wrong_type_is_rejected(section, key, value, message):
    with pytest.raises(SpecError) as info:
        dsagen.spec_from_dict(with_value(section, key, value))
    assert message in str(info.value)


# ------------------------------------------------------------------------------------------------
# impossible values

@pytest.mark.parametrize("section,key,value,message", [
    pytest.param("indexer", "heads", 0, "indexer.heads=0 is out of range: allowed 1..1024", id="indexer-heads-0"),
    pytest.param("indexer", "heads", 1025, "indexer.heads=1025 is out of range", id="indexer-heads-1025"),
    pytest.param("attention", "heads", 0, "attention.heads=0 is out of range", id="attention-heads-0"),
    pytest.param("attention", "heads", -4, "attention.heads=-4 is out of range", id="attention-heads-negative"),
    pytest.param("topk", "k", 0, "topk.k=0 is out of range: allowed 1..1048576", id="k-0"),
    pytest.param("topk", "k", 2**20 + 1, "topk.k=1048577 is out of range", id="k-over-2^20"),
    pytest.param("indexer", "head_dim", 257, "indexer.head_dim=257 is out of range: allowed 1..256",
                 id="head_dim-257"),
    pytest.param("indexer", "head_dim", 0, "indexer.head_dim=0 is out of range", id="head_dim-0"),
    pytest.param("attention", "qk_dim", 641, "attention.qk_dim=641 is out of range", id="qk_dim-641"),
    pytest.param("attention", "v_dim", 600, "attention.v_dim=600 must be <= attention.qk_dim=576",
                 id="v_dim-above-qk_dim"),
    pytest.param("attention", "v_dim", 0, "attention.v_dim=0 is out of range", id="v_dim-0"),
])
def test_impossible_value_is_rejected(section, key, value, message):
    with pytest.raises(SpecError) as info:
        dsagen.spec_from_dict(with_value(section, key, value))
    assert message in str(info.value)


def test_v_dim_above_qk_dim_message_is_exact():
    with pytest.raises(SpecError) as info:
        dsagen.spec_from_dict(with_value("attention", "v_dim", 600))
    assert str(info.value) == "attention.v_dim=600 must be <= attention.qk_dim=576"


def test_v_dim_above_512_is_rejected():
    data = v32_dict()
    data["attention"] |= {"qk_dim": 600, "v_dim": 520}
    with pytest.raises(SpecError, match=r"attention.v_dim=520 is out of range: allowed 1..512"):
        dsagen.spec_from_dict(data)


@pytest.mark.parametrize("qk_dim,v_dim", [pytest.param(640, 511, id="rope-129"),
                                          pytest.param(200, 8, id="rope-192")])
def test_rope_part_above_128_is_rejected(qk_dim, v_dim):
    data = v32_dict()
    data["attention"] |= {"qk_dim": qk_dim, "v_dim": v_dim}
    with pytest.raises(SpecError, match=r"qk_dim - v_dim must be <= 128") as info:
        dsagen.spec_from_dict(data)
    assert f"attention.qk_dim={qk_dim}" in str(info.value)


@pytest.mark.parametrize("qk_dim,v_dim", [pytest.param(640, 512, id="rope-128"),
                                          pytest.param(48, 48, id="rope-0"),
                                          pytest.param(1, 1, id="one-by-one")])
def test_boundary_dims_are_accepted(qk_dim, v_dim):
    data = v32_dict()
    data["attention"] |= {"qk_dim": qk_dim, "v_dim": v_dim}
    assert dsagen.spec_from_dict(data).attention.rope_dim == qk_dim - v_dim


def test_boundary_sizes_are_accepted():
    spec = Spec(indexer=IndexerSpec(heads=1024, head_dim=256, dtype="bf16"), topk=TopKSpec(k=2**20),
                attention=AttentionSpec(heads=1, qk_dim=1, v_dim=1))
    assert spec.topk.k == 2**20


@pytest.mark.parametrize("section,value,allowed", [
    pytest.param("indexer", "fp16", "allowed 'fp8_e4m3', 'bf16'", id="indexer-fp16"),
    pytest.param("indexer", "FP8_E4M3", "allowed 'fp8_e4m3', 'bf16'", id="indexer-uppercase"),
    pytest.param("attention", "fp8_e4m3", "allowed 'bf16'", id="attention-fp8"),
    pytest.param("attention", "float32", "allowed 'bf16'", id="attention-float32"),
])
def test_dtype_not_allowed_lists_allowed(section, value, allowed):
    with pytest.raises(SpecError) as info:
        dsagen.spec_from_dict(with_value(section, "dtype", value))
    assert f"{section}.dtype={value!r} is not supported: {allowed}" == str(info.value)


@pytest.mark.parametrize("value", [
    pytest.param(0.0, id="zero"), pytest.param(0, id="int-zero"), pytest.param(-0.1, id="negative"),
    pytest.param(math.nan, id="nan"), pytest.param(math.inf, id="inf"), pytest.param(-math.inf, id="-inf"),
])
def test_bad_sm_scale_is_rejected(value):
    with pytest.raises(SpecError, match=r"attention.sm_scale=.* must be a finite number > 0"):
        dsagen.spec_from_dict(with_value("attention", "sm_scale", value))


@pytest.mark.parametrize("value", [pytest.param(1, id="int"), pytest.param(1e-3, id="small-float")])
def test_good_sm_scale_is_accepted(value):
    assert dsagen.spec_from_dict(with_value("attention", "sm_scale", value)).attention.softmax_scale == value


# ------------------------------------------------------------------------------------------------
# Spec(...) built directly is validated the same way

@pytest.mark.parametrize("kwargs,message", [
    pytest.param({"indexer": IndexerSpec(heads=0)}, "indexer.heads=0", id="indexer-heads-0"),
    pytest.param({"topk": TopKSpec(k=0)}, "topk.k=0", id="k-0"),
    pytest.param({"attention": AttentionSpec(v_dim=600)}, "attention.v_dim=600 must be <= attention.qk_dim=576",
                 id="v_dim-above-qk_dim"),
    pytest.param({"attention": AttentionSpec(sm_scale=math.nan)}, "attention.sm_scale=nan", id="sm_scale-nan"),
    pytest.param({"indexer": IndexerSpec(dtype="int8")}, "indexer.dtype='int8'", id="indexer-int8"),
    pytest.param({"name": ""}, "name=''", id="empty-name"),
    pytest.param({"schedule": {"flash": {}}}, "schedule.flash is not a kernel", id="schedule-unknown-kernel"),
])
def test_spec_constructor_validates(kwargs, message):
    with pytest.raises(SpecError) as info:
        Spec(**kwargs)
    assert message in str(info.value)


def test_spec_errors_are_dsagen_and_value_errors():
    with pytest.raises(dsagen.DsagenError):
        Spec(topk=TopKSpec(k=-1))
    with pytest.raises(ValueError):
        Spec(topk=TopKSpec(k=-1))


# ------------------------------------------------------------------------------------------------
# files

def test_invalid_toml_names_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[indexer\nheads = 64\n")
    with pytest.raises(SpecError, match="not valid TOML") as info:
        dsagen.load_spec(path)
    assert str(path) in str(info.value)


def test_invalid_spec_in_file_names_the_file_and_key(tmp_path):
    path = tmp_path / "typo.toml"
    path.write_text(V32.read_text().replace("heads = 64", "haeds = 64"))
    with pytest.raises(SpecError) as info:
        dsagen.load_spec(path)
    assert str(info.value).startswith(f"{path}: unknown key indexer.haeds")


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_unreadable_path(tmp_path, kind):
    path = tmp_path / "nope.toml"
    if kind == "directory":
        path.mkdir()
    with pytest.raises(SpecError, match="cannot read spec file") as info:
        dsagen.load_spec(path)
    assert str(path) in str(info.value)


def test_non_utf8_file_names_the_file(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(V32.read_bytes().replace(b"# DeepSeek", b"# \xe9 DeepSeek"))
    with pytest.raises(SpecError) as info:
        dsagen.load_spec(path)
    assert str(path) in str(info.value)


def test_a_utf8_byte_order_mark_is_read_past(tmp_path):
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf" + V32.read_bytes())
    assert dsagen.load_spec(path) == dsagen.load_spec(V32)
    path.write_bytes(b"\xef\xbb\xbf[indexer\n")  # errors still point at the text's own line and column
    with pytest.raises(SpecError, match=r"not valid TOML: .*\(at line 1, column 9\)"):
        dsagen.load_spec(path)


def test_toml_nan_sm_scale_is_rejected(tmp_path):
    path = tmp_path / "nan.toml"
    path.write_text(V32.read_text().replace("sm_scale = 0.13523", "sm_scale = nan"))
    with pytest.raises(SpecError, match="attention.sm_scale=nan must be a finite number > 0"):
        dsagen.load_spec(path)


@pytest.mark.parametrize("text", ["a = " + "[" * 100000, "a = " + "{b = " * 100000,
                                  "[indexer]\nheads = " + "[" * 3000 + "]" * 3000 + "\n"],
                         ids=["arrays", "inline-tables", "closed-arrays-in-a-key"])
def test_deeply_nested_toml_is_one_error_naming_the_file(tmp_path, text):
    path = tmp_path / "deep.toml"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        dsagen.load_spec(path)
    assert str(info.value) == f"{path}: not valid TOML: nested too deeply"


def test_a_value_too_deep_to_check_is_one_error_naming_the_file(tmp_path, monkeypatch):
    """Parsed, but too deep for the checks that print it: still a SpecError naming the file."""
    import dsagen.spec as spec_module

    def too_deep(data):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(spec_module, "spec_from_dict", too_deep)
    with pytest.raises(SpecError) as info:
        spec_module.load_spec(V32)
    assert str(info.value) == f"{V32}: a value is nested too deeply"


def test_schedule_table_with_unknown_kernel(tmp_path):
    path = tmp_path / "sched.toml"
    path.write_text(V32.read_text() + "\n[schedule.flash_attention]\nblock_h = 64\n")
    with pytest.raises(SpecError, match="schedule.flash_attention is not a kernel: allowed "
                                        "indexer, topk, sparse_attention"):
        dsagen.load_spec(path)


@pytest.mark.parametrize("value,shown", [pytest.param('"64"', "'64'", id="string"),
                                         pytest.param("64.0", "64.0", id="float"),
                                         pytest.param("true", "True", id="bool")])
def test_schedule_knob_must_be_integer(tmp_path, value, shown):
    path = tmp_path / "sched.toml"
    path.write_text(V32.read_text() + f"\n[schedule.sparse_attention]\nblock_h = {value}\n")
    with pytest.raises(SpecError, match=rf"schedule.sparse_attention.block_h={shown} must be an integer"):
        dsagen.load_spec(path)


def test_schedule_kernel_must_be_a_table():
    with pytest.raises(SpecError, match="schedule.topk must be a table"):
        dsagen.spec_from_dict(v32_dict() | {"schedule": {"topk": 3}})


# ------------------------------------------------------------------------------------------------
# dsagen.schedule.choose

def test_v32_defaults_are_legal_on_h200():
    spec = dsagen.load_spec(V32)
    for kernel in STAGES:
        choice = choose(spec, kernel, H200)
        assert choice.source == "default"
        assert choice.point == load_space("triton", kernel).default_point()


def test_pinned_unknown_knob_is_named_with_allowed_knobs():
    spec = Spec(schedule={"sparse_attention": {"block_q": 64}})
    with pytest.raises(ScheduleError) as info:
        choose(spec, "sparse_attention", H200)
    message = str(info.value)
    assert "schedule.sparse_attention.block_q is not a knob of triton/sparse_attention" in message
    for knob in load_space("triton", "sparse_attention").knobs:
        assert knob in message.split("allowed", 1)[1]


def test_pinned_value_not_allowed_lists_values():
    spec = Spec(schedule={"sparse_attention": {"block_h": 48}})
    with pytest.raises(ScheduleError) as info:
        choose(spec, "sparse_attention", H200)
    assert str(info.value) == "schedule.sparse_attention.block_h=48 is not allowed: choose one of [16, 32, 64, 128]"


def test_pinned_illegal_point_names_the_broken_constraint():
    spec = Spec(schedule={"sparse_attention": {"block_h": 128, "block_n": 128, "num_stages": 3}})
    with pytest.raises(ScheduleError) as info:
        choose(spec, "sparse_attention", H200)
    message = str(info.value)
    assert "is illegal for this spec on nvidia-h200" in message
    assert "shared_memory (smem_bytes <= smem_limit)" in message


def test_override_is_checked_like_pinned_knobs():
    with pytest.raises(ScheduleError, match=r"override.radix_bits=3 is not allowed"):
        choose(Spec(), "topk", H200, override={"radix_bits": 3})
    choice = choose(Spec(), "topk", H200, override={"block_n": 512})
    assert choice.point["block_n"] == 512 and choice.source == "pinned+default"


def test_fully_pinned_legal_point_is_used_as_is():
    point = {"block_h": 32, "block_n": 32, "num_warps": 4, "num_stages": 1, "v_split": 2, "index_prefetch": 1}
    choice = choose(Spec(schedule={"sparse_attention": point}), "sparse_attention", H200)
    assert choice.point == point and choice.source == "pinned" and choice.variant == "tl"


def test_pinned_variant_chooses_the_algorithm_and_its_space():
    spec = Spec(schedule={"sparse_attention": {"variant": "gluon_split", "block_n": 32}})
    choice = choose(spec, "sparse_attention", H200)
    assert choice.variant == "gluon_split" and choice.point == {"block_n": 32, "num_stages": 2}
    assert choice.source == "pinned+default"


@pytest.mark.parametrize("value", ["gluon2", "", 1, True])
def test_pinned_variant_must_be_a_declared_name(value):
    with pytest.raises(SpecError, match=r"schedule\.sparse_attention\.variant=.* is not a variant of sparse_attention: "
                                        r"allowed 'tl', 'gluon', 'gluon_split'"):
        Spec(schedule={"sparse_attention": {"variant": value}})


def test_a_kernel_with_one_algorithm_has_no_variant_to_pin():
    with pytest.raises(SpecError, match=r"schedule\.topk\.variant='tl' .* allowed none"):
        Spec(schedule={"topk": {"variant": "tl"}})


@pytest.mark.parametrize("kernel", ["indexer", "sparse_attention"])
def test_default_for_three_heads_moves_to_a_legal_point(kernel):
    spec = small_spec()
    space = load_space("triton", kernel)
    problem = problem_symbols(spec, get_op(kernel), H200)
    assert space.violations(space.default_point(), problem), "the default should be illegal for 3 heads"
    choice = choose(spec, kernel, H200)
    assert choice.source == "default (nearest legal)"
    assert space.violations(choice.point, problem) == []
    assert choice.point["block_h"] <= 16


def test_pinned_knob_stays_when_the_rest_moves():
    spec = Spec(indexer=IndexerSpec(heads=3, head_dim=50, dtype="bf16"), schedule={"indexer": {"block_n": 64}})
    choice = choose(spec, "indexer", H200)
    assert choice.point["block_n"] == 64
    assert choice.source == "pinned+nearest legal"
    assert load_space("triton", "indexer").violations(choice.point, problem_symbols(spec, get_op("indexer"), H200)) == []


LEGALITY_SPECS = {
    "v32": lambda: dsagen.load_spec(V32),
    "three-heads": lambda: small_spec(),
    "wide": lambda: Spec(indexer=IndexerSpec(heads=1024, head_dim=256, dtype="bf16"), topk=TopKSpec(k=2**20),
                         attention=AttentionSpec(heads=1024, qk_dim=640, v_dim=512)),
}


@pytest.mark.parametrize("gpu", ["nvidia-h200", "nvidia-a100"])
@pytest.mark.parametrize("spec_name", list(LEGALITY_SPECS))
@pytest.mark.parametrize("kernel", STAGES)
def test_legal_points_agree_with_violations(kernel, spec_name, gpu):
    """legal_points (lambdified) and violations (sympy subs) must agree on every grid point."""
    spec = LEGALITY_SPECS[spec_name]()
    target = get_gpu(gpu)
    space = load_space("triton", kernel)
    problem = problem_symbols(spec, get_op(kernel), target)
    legal = space.legal_points(problem)
    assert legal, "no legal schedule at all"
    for point in legal:
        assert space.violations(point, problem) == [], point
    legal_keys = {tuple(sorted(p.items())) for p in legal}
    illegal = [p for p in space.grid() if tuple(sorted(p.items())) not in legal_keys]
    for point in illegal[::7]:  # a sample of the rest: each must break something
        assert space.violations(point, problem), point


# ------------------------------------------------------------------------------------------------
# semantic_hash

def test_semantic_hash_is_stable_and_short():
    a, b = dsagen.load_spec(V32), dsagen.spec_from_dict(v32_dict())
    assert semantic_hash(a) == semantic_hash(b)
    assert len(semantic_hash(a)) == 16 and int(semantic_hash(a), 16) >= 0


@pytest.mark.parametrize("section,key,value", [
    pytest.param("indexer", "heads", 32, id="indexer.heads"),
    pytest.param("indexer", "head_dim", 64, id="indexer.head_dim"),
    pytest.param("indexer", "dtype", "bf16", id="indexer.dtype"),
    pytest.param("topk", "k", 1024, id="topk.k"),
    pytest.param("attention", "heads", 16, id="attention.heads"),
    pytest.param("attention", "qk_dim", 512, id="attention.qk_dim"),
    pytest.param("attention", "v_dim", 448, id="attention.v_dim"),
])
def test_semantic_hash_changes_with_a_semantic_field(section, key, value):
    base = dsagen.spec_from_dict(v32_dict())
    changed = dsagen.spec_from_dict(with_value(section, key, value))
    assert semantic_hash(changed) != semantic_hash(base)


def test_semantic_hash_ignores_the_run_time_softmax_scale():
    """sm_scale is a launcher argument, not part of any kernel's code, so tuned entries carry over."""
    base = dsagen.spec_from_dict(v32_dict())
    changed = dsagen.spec_from_dict(with_value("attention", "sm_scale", 0.1))
    assert semantic_hash(changed) == semantic_hash(base)
    assert semantic_hash(changed, "sparse_attention") == semantic_hash(base, "sparse_attention")


def test_semantic_hash_ignores_name_and_schedule():
    base = dsagen.spec_from_dict(v32_dict())
    other = dsagen.spec_from_dict(v32_dict() | {"name": "renamed", "schedule": {"topk": {"block_n": 512}}})
    assert semantic_hash(other) == semantic_hash(base)
    for kernel in STAGES:
        assert semantic_hash(other, kernel) == semantic_hash(base, kernel)


# sparse_attention is not listed as unaffected by topk.k: its kernel depends on k too (reported)
@pytest.mark.parametrize("section,key,value,owner,unaffected", [
    pytest.param("indexer", "heads", 32, "indexer", ("topk", "sparse_attention"), id="indexer.heads"),
    pytest.param("topk", "k", 1024, "topk", ("indexer",), id="topk.k"),
    pytest.param("attention", "heads", 16, "sparse_attention", ("indexer", "topk"), id="attention.heads"),
])
def test_per_kernel_hash_depends_only_on_its_section(section, key, value, owner, unaffected):
    base = dsagen.spec_from_dict(v32_dict())
    changed = dsagen.spec_from_dict(with_value(section, key, value))
    assert semantic_hash(changed, owner) != semantic_hash(base, owner)
    for kernel in unaffected:
        assert semantic_hash(changed, kernel) == semantic_hash(base, kernel), kernel


def test_per_kernel_hashes_differ_from_each_other_and_the_whole():
    spec = Spec()
    hashes = {semantic_hash(spec, k) for k in STAGES} | {semantic_hash(spec)}
    assert len(hashes) == 4


def test_attention_hash_covers_topk_width_and_normalises_the_scale():
    base = Spec()
    wider = Spec(topk=TopKSpec(k=1024))
    assert semantic_hash(base, "sparse_attention") != semantic_hash(wider, "sparse_attention")
    default = Spec(attention=AttentionSpec(sm_scale=None))
    explicit = Spec(attention=AttentionSpec(sm_scale=576 ** -0.5))
    assert semantic_hash(default, "sparse_attention") == semantic_hash(explicit, "sparse_attention")
    assert semantic_hash(Spec(attention=AttentionSpec(sm_scale=1))) == semantic_hash(Spec(attention=AttentionSpec(sm_scale=1.0)))


def test_spec_is_hashable_and_its_schedule_read_only():
    spec = Spec(schedule={"topk": {"block_n": 512}})
    assert hash(spec) == hash(Spec(schedule={"topk": {"block_n": 1024}}))  # schedule is not semantic
    with pytest.raises(TypeError):
        spec.schedule["topk"]["block_n"] = 4096  # type: ignore[index]
    with pytest.raises(TypeError):
        spec.schedule["indexer"] = {}  # type: ignore[index]


# ------------------------------------------------------------------------------------------------
# topk.fused: an execution choice, validated, outside every semantic hash

def test_topk_fused_is_a_boolean_outside_the_semantic_hash():
    fused = dsagen.spec_from_dict(with_value("topk", "fused", True))
    plain = dsagen.spec_from_dict(v32_dict())
    assert fused.topk.fused is True and plain.topk.fused is False
    for kernel in STAGES + ("indexer_topk",):
        assert semantic_hash(fused, kernel) == semantic_hash(plain, kernel)
    assert semantic_hash(plain, "indexer_topk") != semantic_hash(plain, "indexer")  # it depends on k too
    with pytest.raises(SpecError, match=r"topk.fused=1 must be true or false"):
        dsagen.spec_from_dict(with_value("topk", "fused", 1))
