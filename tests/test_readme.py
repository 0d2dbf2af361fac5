"""The README's training-loop quickstart runs as written (on the CPU, one short epoch)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def quickstart_code() -> str:
    section = README.read_text().split("## Quickstart: a training loop", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_quickstart_trains_on_the_cpu():
    code = quickstart_code()
    assert "reg.refresh(train)" in code and "reg.penalty()" in code
    code = code.replace(".cuda()", "").replace("range(10)", "range(1)")
    code = code.replace(
        "mnist_loaders(batch_size=1500)", "mnist_loaders(batch_size=1500, limit_train=3000)"
    )
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    assert namespace["reg"].refreshed
    assert set(namespace["reg"].spectra()) == {"hidden1", "hidden2", "hidden3"}
