"""benchmarks/knn_kernels.py's two decode paths (what the GPU benchmark times) agree, run here on
CPU with the Triton kernels interpreted: the script is ready for the device."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from knn_kernels import decode_step_fused, decode_step_reference, make_inputs, parse_args  # noqa: E402


@pytest.mark.parametrize("b, hq, hkv, n, d, local, k", [(2, 9, 3, 100, 16, 7, 5), (1, 4, 4, 33, 32, 1, 40)])
def test_fused_decode_step_matches_the_reference(b, hq, hkv, n, d, local, k):
    q, kc, vc, mem_k, mem_v = make_inputs(b, hq, hkv, n, d, local, torch.float32, "cpu")
    fused = decode_step_fused(q, kc, vc, mem_k, mem_v, k, backend="triton")
    ref = decode_step_reference(q, kc, vc, mem_k, mem_v, k)
    assert fused.shape == ref.shape == (b, hq, 1, d)
    torch.testing.assert_close(fused, ref, atol=2e-5, rtol=2e-5)


def test_arguments():
    args = parse_args(["--heads", "3/9", "--n", "65536"])
    assert (args.hkv, args.hq, args.n) == (3, 9, [65536])
    with pytest.raises(SystemExit):
        parse_args(["--heads", "3/8"])
