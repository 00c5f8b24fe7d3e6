"""benchmarks/profile_ops.py: attribution of device time to named scopes and kernels."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.profile_ops import hlo_op_names, scope_of, summarize  # noqa: E402


def test_scope_of_innermost_scope_and_direction():
    assert scope_of("jit(step)/jvp(gdn)/gdn_core/pallas_call") == "gdn_core fwd"
    assert scope_of("jit(step)/transpose(jvp(mlp))/dot_general") == "mlp bwd"
    assert scope_of("jit(step)/optimizer/add") == "optimizer fwd"
    assert scope_of("jit(step)/while/body/add") == "other fwd"


def test_summarize_device_track_and_hlo_lookup():
    hlo = '''
  %loop_add_fusion.3 = f32[8]{0} fusion(f32[8]{0} %p), kind=kLoop, metadata={op_name="jit(step)/transpose(jvp(mlp))/add" source_file="x.py"}
  ROOT %custom-call.7 = bf16[4]{0} custom-call(), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(step)/jvp(gdn)/gdn_core/pallas_call"}
'''
    names = hlo_op_names(hlo)
    assert names["loop_add_fusion_3"].endswith("transpose(jvp(mlp))/add")
    events = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
        # inside a command buffer: tf_op is "XlaModule:", the kernel name finds the HLO op
        {"ph": "X", "pid": 1, "name": "loop_add_fusion_3", "dur": 3000.0, "args": {"tf_op": "XlaModule:"}},
        {"ph": "X", "pid": 1, "name": "gdn_fwd", "dur": 1000.0, "args": {"hlo_op": "custom-call.7"}},
        {"ph": "X", "pid": 2, "name": "host work", "dur": 99000.0, "args": {}},  # not device time
    ]
    s = summarize(events, steps=2, hlo_text=hlo)
    assert s["device_track"] and abs(s["total_ms_per_step"] - 2.0) < 1e-9
    scopes = {r["scope"]: r["ms"] for r in s["scopes"]}
    assert scopes == {"mlp bwd": 1.5, "gdn_core fwd": 0.5}
    assert [k["name"] for k in s["kernels"]] == ["loop_add_fusion_3", "gdn_fwd"]
