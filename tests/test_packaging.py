"""The package as pip builds it: what a user who installs the wheel gets, away from this source tree."""

import json
import subprocess
import sys
import zipfile

import numpy as np

from klgrade import grade

from helpers import EXAMPLES, REPO


def test_the_wheel_grades_with_its_shipped_model_and_holds_the_page_and_the_license(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--quiet", "--wheel-dir",
                            str(tmp_path / "dist")], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("klgrade-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"klgrade/weights/msa_net_kneekl224.safetensors", "klgrade/weights/MODEL_CARD.md",
            "klgrade/serve/static/index.html", "klgrade-0.1.0.dist-info/licenses/LICENSE"} <= names
    assert not any(name.startswith(("tests/", "benchmarks/", "tools/")) for name in names)
    site = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(site),
                                str(wheel)], capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-2000:]
    example = sorted(EXAMPLES.glob("KL2_*.jpg"))[0]
    script = ("import json, sys, klgrade; result = klgrade.grade(sys.argv[1]); "
              "print(json.dumps({'module': klgrade.__file__, 'probabilities': list(result.probabilities)}))")
    graded = subprocess.run([sys.executable, "-c", script, str(example)],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"})
    assert graded.returncode == 0, graded.stderr[-2000:]
    answer = json.loads(graded.stdout)
    assert answer["module"].startswith(str(site))
    np.testing.assert_allclose(answer["probabilities"], grade(example).probabilities, atol=1e-5)  # this tree's
