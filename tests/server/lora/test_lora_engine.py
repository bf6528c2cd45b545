"""LoRA in the engine core: slots swapped least-recently-used with requests waiting for one, the prefix cache kept
apart per adapter, unloading with requests in flight, and adapters refused with one clear line."""

from __future__ import annotations

import json
import shutil

import pytest
from lora_helpers import (
    PROMPTS,
    greedy_params,
    lora_core,
    make_peft_model,
    reference_greedy,
    run_requests,
    save_model,
    tiny_llama,
)
from safetensors.torch import load_file, save_file

from weir_server.config import LoRAConfig
from weir_server.engine.types import GenerationRequest
from weir_server.errors import InvalidRequestError, ModelLoadError, NotFoundError

NAMES = ("a", "b", "c", "d")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-engine")
    hf_model = tiny_llama()
    save_model(hf_model, root / "base")
    folders = {name: root / name for name in NAMES}
    peft_models = {name: make_peft_model(hf_model, folders[name], rank=4, seed=10 + i) for i, name in enumerate(NAMES)}
    return hf_model, root / "base", peft_models, folders


def test_more_adapters_than_slots_swap_lru_and_requests_wait_for_a_slot(family):
    hf_model, base, peft_models, folders = family
    core = lora_core(base, folders, LoRAConfig(max_lora_rank=8, max_loras=2))
    requests = [(PROMPTS[i % 4], NAMES[i % 4]) for i in range(8)] + [(PROMPTS[0], None)]
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(requests))}
    for i, (prompt, adapter) in enumerate(requests):
        core.add_request(core.validate(GenerationRequest(str(i), prompt, greedy_params(5), adapter=adapter)))
    saw_waiting = False
    while core.has_unfinished():
        for out in core.step():
            tokens[out.request_id].extend(out.token_ids)
        running = {s.adapter.info.name for s in core.scheduler.running if s.adapter is not None}
        assert len(running) <= 2  # a step never needs more adapters than slots
        stats = core.stats()
        assert stats.max_loras == 2
        saw_waiting |= bool(stats.lora_waiting)
    assert saw_waiting
    for i, (prompt, adapter) in enumerate(requests):
        reference = hf_model if adapter is None else peft_models[adapter]
        assert tokens[str(i)] == reference_greedy(reference, prompt, 5), (i, adapter)


def test_preempted_requests_give_back_their_slot_and_resume_with_their_adapter(family):
    hf_model, base, peft_models, folders = family
    # 14 blocks of 4 tokens cannot hold four prompts of up to 17 tokens growing by 12: some are preempted.
    core = lora_core(base, folders, LoRAConfig(max_lora_rank=8, max_loras=2), num_blocks=14, max_num_batched_tokens=32)
    requests = [(PROMPTS[i], ("a", "b", None, "c")[i]) for i in range(4)]
    outputs = run_requests(core, requests, max_tokens=12)
    assert core.scheduler.num_preemptions > 0
    assert all(adapter.num_running == 0 for adapter in core.lora.adapters.values())
    for (prompt, adapter), tokens in zip(requests, outputs, strict=True):
        reference = hf_model if adapter is None else peft_models[adapter]
        assert tokens == reference_greedy(reference, prompt, 12), adapter


def test_stats_count_running_and_waiting_requests_per_adapter(family):
    _, base, _, folders = family
    core = lora_core(base, folders, LoRAConfig(max_lora_rank=8, max_loras=1), max_num_seqs=8)
    for i, adapter in enumerate(["a", "a", "b", None]):
        core.add_request(core.validate(GenerationRequest(str(i), PROMPTS[0], greedy_params(4), adapter=adapter)))
    core.step()
    stats = core.stats()
    assert dict(stats.lora_running) == {"a": 2}
    assert dict(stats.lora_waiting) == {"b": 1}
    assert stats.num_running == 3  # the base request runs beside adapter a


def test_prefix_cache_keeps_adapters_and_the_base_model_apart(family):
    hf_model, base, peft_models, folders = family
    core = lora_core(base, folders)
    prompt = PROMPTS[2]  # 17 tokens: four full blocks of 4

    def run(adapter):
        request = GenerationRequest(f"r{core.num_steps}-{adapter}", prompt, greedy_params(4), adapter=adapter)
        core.add_request(core.validate(request))
        outs = []
        while core.has_unfinished():
            outs += core.step()
        return [t for o in outs for t in o.token_ids], outs[-1].usage.cached_tokens

    assert run(None) == (reference_greedy(hf_model, prompt, 4), 0)
    assert run("a") == (reference_greedy(peft_models["a"], prompt, 4), 0)  # not the base model's blocks
    assert run("b") == (reference_greedy(peft_models["b"], prompt, 4), 0)  # nor adapter a's
    assert run("a")[1] == 16  # its own blocks are reused
    assert run(None)[1] == 16


def test_unloading_lets_requests_in_flight_finish_then_frees_the_adapter(family):
    _, base, peft_models, folders = family
    core = lora_core(base, {"a": folders["a"]})
    for i in range(2):
        core.add_request(core.validate(GenerationRequest(str(i), PROMPTS[i], greedy_params(6), adapter="a")))
    outputs = core.step()
    core.remove_adapter("a")
    with pytest.raises(NotFoundError, match="'a' is not loaded"):
        core.add_request(GenerationRequest("late", PROMPTS[0], greedy_params(2), adapter="a"))
    assert core.lora.num_unloading == 1
    while core.has_unfinished():
        outputs += core.step()
        core.collect_adapters()
    tokens = {str(i): [t for o in outputs if o.request_id == str(i) for t in o.token_ids] for i in range(2)}
    assert tokens["0"] == reference_greedy(peft_models["a"], PROMPTS[0], 6)
    assert tokens["1"] == reference_greedy(peft_models["a"], PROMPTS[1], 6)
    assert core.lora.num_unloading == 0 and all(slot is None for slot in core.lora.slots)
    core.add_adapter(core.read_adapter("a", str(folders["b"])))  # the name is free again
    assert run_requests(core, [(PROMPTS[0], "a")], 4) == [reference_greedy(peft_models["b"], PROMPTS[0], 4)]


# ---- bad adapters --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def core(family):
    _, base, _, folders = family
    return lora_core(base, {"a": folders["a"]}, LoRAConfig(max_lora_rank=8, max_loras=2))


def _copy(folder, tmp_path, name="copy"):
    target = tmp_path / name
    shutil.copytree(folder, target)
    return target


def _refused(core, path, match, field="path", name="x"):
    with pytest.raises(InvalidRequestError, match=match) as error:
        core.read_adapter(name, str(path))
    assert error.value.field == field
    assert "\n" not in str(error.value)


def test_rank_over_the_limit_is_refused(family, core, tmp_path):
    hf_model = family[0]
    make_peft_model(hf_model, tmp_path / "big", rank=16)
    _refused(core, tmp_path / "big", r"rank 16 of .* exceeds --max-lora-rank 8")


def test_shapes_of_another_base_model_are_refused(core, tmp_path):
    other = tiny_llama(hidden_size=32, intermediate_size=48)
    make_peft_model(other, tmp_path / "other", rank=4)
    _refused(
        core, tmp_path / "other", r"down_proj has lora_A \(4, 48\) and lora_B \(32, 4\); the base model needs \(4, 96\)"
    )


def test_missing_and_unreadable_files_are_refused(family, core, tmp_path):
    _refused(core, tmp_path / "nowhere", "adapter_config.json is missing")
    folder = _copy(family[3]["a"], tmp_path)
    (folder / "adapter_model.safetensors").unlink()
    _refused(core, folder, "adapter_model.safetensors is missing")
    (folder / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    _refused(core, folder, "adapter_model.safetensors is unreadable")
    (folder / "adapter_config.json").write_text("{")
    _refused(core, folder, "adapter_config.json is unreadable")


def test_unsupported_targets_and_saved_modules_are_refused(family, core, tmp_path):
    hf_model = family[0]
    make_peft_model(hf_model, tmp_path / "head", rank=4, targets=("q_proj", "lm_head"))
    _refused(core, tmp_path / "head", r"target modules \['lm_head'\] are not supported")
    folder = _copy(family[3]["a"], tmp_path, "saves")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config | {"modules_to_save": ["embed_tokens"]}))
    _refused(core, folder, "modules_to_save .* is not supported")


def test_a_tensor_without_its_pair_is_refused(family, core, tmp_path):
    folder = _copy(family[3]["a"], tmp_path)
    tensors = load_file(folder / "adapter_model.safetensors")
    dropped = next(name for name in tensors if "lora_B" in name)
    save_file({k: v for k, v in tensors.items() if k != dropped}, folder / "adapter_model.safetensors")
    _refused(core, folder, "has no lora_B")


def test_duplicate_and_bad_names_are_refused(family, core):
    _refused(core, family[3]["b"], "an adapter named 'a' is already loaded", field="name", name="a")
    _refused(core, family[3]["b"], "must be 1-256 characters", field="name", name=" padded ")


def test_unknown_adapters_are_not_found(core):
    with pytest.raises(NotFoundError, match="'nope' is not loaded"):
        core.remove_adapter("nope")
    with pytest.raises(NotFoundError, match="'nope' is not loaded"):
        core.add_request(GenerationRequest("x", PROMPTS[0], greedy_params(2), adapter="nope"))


def test_the_engine_keeps_serving_after_refusals(family, core):
    hf_model, _, peft_models, _ = family
    assert run_requests(core, [(PROMPTS[0], "a"), (PROMPTS[1], None)], 4) == [
        reference_greedy(peft_models["a"], PROMPTS[0], 4),
        reference_greedy(hf_model, PROMPTS[1], 4),
    ]


def test_a_bad_startup_adapter_fails_the_start_with_one_line(family, tmp_path):
    _, base, _, _ = family
    lora = LoRAConfig(max_lora_rank=8, lora_modules=(("broken", str(tmp_path / "nowhere")),))
    with pytest.raises(ModelLoadError, match=r"--lora-modules broken=.*adapter_config.json is missing"):
        lora_core(base, {}, lora)


def test_adapters_are_refused_while_lora_is_off(family):
    from lora_helpers import lora_engine_config

    from weir_server.engine.core import EngineCore
    from weir_server.models.loader import load_model

    config = lora_engine_config(family[1])
    config = config.__class__(**{**config.__dict__, "lora": None})
    core = EngineCore(load_model(config.model), config)
    with pytest.raises(InvalidRequestError, match="not enabled"):
        core.read_adapter("a", str(family[3]["a"]))
