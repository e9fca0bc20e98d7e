"""Without the compiled extension the package imports, serves `reference`, and warns once."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import sys, warnings

    class HideExtension:
        # Make `autoft_fast._C` unimportable, as on a machine where it was never built.
        def find_spec(self, name, path=None, target=None):
            if name == "autoft_fast._C":
                raise ImportError("autoft_fast._C hidden by the test")
            return None

    sys.meta_path.insert(0, HideExtension())
    import torch, autoft_fast

    assert autoft_fast.available_backends("cpu") == ["reference"], autoft_fast.available_backends("cpu")
    f = torch.randn(10, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            out, gates = autoft_fast.gated_embedding(torch.tensor([1, 2]), f, f.clone(),
                                                     torch.zeros(2, 2), noise=False)
    build_hints = [w for w in caught if "pip install --no-build-isolation" in str(w.message)]
    assert len(build_hints) == 1, [str(w.message) for w in caught]
    assert torch.equal(out, f[[1, 2]])
    try:
        autoft_fast.gated_embedding(torch.tensor([1]), f, f.clone(), torch.zeros(1, 2), backend="cpu")
    except ValueError as e:
        assert "not built" in str(e), e
    else:
        raise AssertionError("backend='cpu' without the extension must raise")
    print("ok")
""")


def test_imports_and_warns_once_without_the_extension():
    # Neither the quiet switch nor the Triton interpreter (which would add a backend).
    env = {k: v for k, v in os.environ.items() if k not in ("AUTOFT_FAST_QUIET", "TRITON_INTERPRET")}
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().endswith("ok")
