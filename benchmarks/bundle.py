"""`bash benchmark.sh bundle DIR`: a folder of wheels that installs qsm_continuous.py's packages on an offline machine.

For a CUDA machine with Python and torch already installed but no package index (an air-gapped cluster node, a lent
GPU): run this where an index is reachable, copy DIR over, and install with the line it prints
(`pip install --no-index --find-links DIR -r DIR/requirements.txt`). The wheels are those of requirements.txt for
--python-version (default 3.12) on manylinux x86_64, without torch and the packages such a machine holds (numpy,
scipy, lxml, absl-py, ...: --have). dm_control's wheel (56 MB) is repacked with only what the Control Suite loads:
locomotion, its soccer and walker meshes, the test assets, the Blender exporter and the dog's meshes (so the `dog-*`
tasks are left out) are dropped, and it is installed without its locomotion-only dependency labmaze. Not in the
bundle: wandb (only for --track; an offline node logs to TensorBoard), imageio-ffmpeg (68 MB: --capture-video needs
it), the summary's rliable/arch/pandas.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# what qsm_continuous.py imports, pinned as requirements.txt pins them, and the dependencies a torch image may lack
PACKAGES = [
    "dm_control",
    "mujoco",
    "tyro",
    "docstring-parser",
    "typeguard",
    "dm-env",
    "dm-tree",
    "glfw",
    "pyopengl",
    "websockets",
    "etils",
    "imageio",
    "tqdm",
    "tensorboard",
]
HAVE = ["etils", "imageio", "tqdm", "tensorboard"]  # in the lent GPU image (device tool's KINDS.md); --have to change
DROP = (
    "dm_control/locomotion/",
    "dm_control/suite/dog_assets/",
    "dm_control/mujoco/testing/",
    "dm_control/blender/",
    "dm_control/mjcf/test_assets/",
    "dm_control/suite/all_domains.png",
    "dm_control/third_party/kinova/",
)


def pins():
    """{name: 'name==version'} from requirements.txt."""
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        lines = [line.split("#")[0].strip() for line in f]
    return {line.split("==")[0].lower().replace("_", "-"): line for line in lines if "==" in line}


def trim_wheel(path):
    """Rewrites a dm_control wheel without the DROP paths (its RECORD rewritten to match); returns the new size."""
    with zipfile.ZipFile(path) as old:
        items = [(info, old.read(info)) for info in old.infolist() if not info.filename.startswith(DROP)]
    kept = {info.filename for info, _ in items}
    with zipfile.ZipFile(f"{path}.new", "w", zipfile.ZIP_DEFLATED, compresslevel=9) as new:
        for info, data in items:
            if info.filename.endswith(".dist-info/RECORD"):
                rows = data.decode().splitlines()
                data = "\n".join(row for row in rows if row.split(",")[0] in kept or row.endswith(",,")).encode()
                data += b"\n"
            new.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    os.replace(f"{path}.new", path)
    return os.path.getsize(path)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="bash benchmark.sh bundle", description=__doc__.split("\n")[0])
    parser.add_argument("out", metavar="DIR")
    parser.add_argument("--python-version", default="3.12")
    parser.add_argument("--have", nargs="*", default=HAVE, help="packages the target machine already holds")
    opts = parser.parse_args(argv)
    pinned = pins()
    wanted = [pinned.get(name.replace("_", "-"), name) for name in PACKAGES if name not in opts.have]
    os.makedirs(opts.out, exist_ok=True)
    platforms = [f"--platform={p}" for p in ("manylinux2014_x86_64", "manylinux_2_28_x86_64", "any")]
    with tempfile.TemporaryDirectory() as tmp:  # --no-deps: the list above is the closure, minus what torch brings
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
            "--dest",
            tmp,
            f"--python-version={opts.python_version}",
            *platforms,
            *wanted,
        ]
        if subprocess.run(cmd).returncode:
            sys.exit("error: pip download failed: run this where a package index is reachable")
        for name in os.listdir(tmp):
            if name.startswith("dm_control-"):
                trim_wheel(os.path.join(tmp, name))
            os.replace(os.path.join(tmp, name), os.path.join(opts.out, name))
    with open(os.path.join(opts.out, "requirements.txt"), "w") as f:
        f.write("\n".join(wanted) + "\n")
    size = sum(os.path.getsize(os.path.join(opts.out, n)) for n in os.listdir(opts.out))
    print(
        f"{opts.out}: {len(wanted)} wheels, {size / 2**20:.1f} MiB; install on the offline machine with:\n"
        f"  pip install --no-index --no-deps --find-links {opts.out} -r {opts.out}/requirements.txt"
    )


if __name__ == "__main__":
    main()
