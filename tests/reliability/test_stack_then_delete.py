"""Issue 17's report: serve a stack of two patches, then DELETE the second. With an engine whose
LoRA calls yield (as vLLM's do), two unload passes interleaved and the delete answered 500
(KeyError in unload_retired)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from app.engine.types import LoraTarget
from app.patches.targets import ServingTargets
from tests.api.conftest import NO_SCORING
from tests.conftest import ADMIN, make_settings
from tests.reliability.engine import RecordingEngine
from tests.support.api_client import assert_error, chat
from tests.support.apps import running_app

pytestmark = NO_SCORING


def test_delete_the_second_patch_of_a_served_stack(tiny_model: Path, store: Path, tmp_path: Path):
    engine = RecordingEngine(yields=3)
    settings = make_settings(tiny_model, tmp_path, dev_mode=True)
    with running_app(settings, engine) as (client, _):
        for patches in (["alpha", "beta"], ["beta"], ["alpha"]):
            response = chat(client, safety_patches=patches)
            assert response.status_code == 200, response.text
        served = {lora.name: lora.int_id for _, lora in engine.calls if lora}
        assert set(served) == {"alpha+beta", "alpha", "beta"}

        response = client.delete("/admin/adapters/beta", headers=ADMIN)
        assert response.status_code == 204, response.text

        # beta and the stack holding it left the engine, each exactly once; alpha stayed
        removed = [int_id for op, int_id in engine.log if op == "remove"]
        assert sorted(removed) == sorted([served["alpha+beta"], served["beta"]])
        assert set(engine.loaded) == {served["alpha"]}
        assert engine.max_in_call == 1, "engine LoRA calls overlapped"
        assert_error(chat(client, safety_patches=["alpha", "beta"]), 404, "patch_not_found")
        assert chat(client, safety_patches=["alpha"]).status_code == 200


async def test_concurrent_unload_passes_remove_each_lora_once(tmp_path: Path) -> None:
    """The mechanism itself: retire two LoRAs (each schedules a pass) and await a third pass."""
    engine = RecordingEngine(yields=3)
    targets = ServingTargets(tmp_path / "stacked", max_rank=32, engine=engine)
    loras = [LoraTarget(f"p{i}", i, tmp_path / f"p{i}") for i in (1, 2)]
    for lora in loras:
        await engine.add_lora(lora)
    for lora in loras:
        targets.retire(lora)
    await targets.unload_retired()
    for _ in range(20):  # let the scheduled passes finish
        await asyncio.sleep(0)
    assert sorted(i for op, i in engine.log if op == "remove") == [1, 2]
    assert engine.loaded == {}
    assert engine.max_in_call == 1
