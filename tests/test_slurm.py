"""The SLURM profile (issue 8).

Default suite (seconds): the test profile is profiles/slurm-h100 with only its site values
changed, the H100 profile sends every rule that declares a GPU to the GPU partition, the
workstation profile runs one GPU job at a time, and the SLURM profiles are valid Snakemake
options.

`pytest -m slurm` (root, FEMURSR_SLURM_TEST=1; CI does this): tests/slurm/setup_slurm.sh installs
and starts a one-node SLURM with accounting, and a part of the demo (two subjects through
preprocessing, the split and the training of one SR model, 16 jobs of 8 rules) runs through
`snakemake --profile tests/slurm/profile`. The training job is requeued while it runs, as a
preemption would. sacct must show every job COMPLETED in the partition and account the profile
asks for, the training with its GPU (gres/gpu:h100), the training must have resumed from its
checkpoint, and the outputs must equal those of a local run of the same targets.
"""

import gzip
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, SNAKEMAKE, run_snakemake, small_synthetic

H100 = REPO / "profiles" / "slurm-h100" / "config.yaml"
TEST_PROFILE = REPO / "tests" / "slurm" / "profile"
SLURM_DIR = REPO / "tests" / "slurm"

# what a site sets; everything else of the test profile must equal the H100 profile
SITE_KEYS = (
    r"slurm-init-seconds-before-status-checks",
    r"default-resources\.slurm_partition",
    r"default-resources\.slurm_account",
    r"set-resources\.\w+\.slurm_partition",
    r"set-resources\.\w+\.gpu_model",
)
# femur_mask asks for a GPU only with preprocessing.mask.nnunet.device: cuda (see the profile)
# rules that declare a GPU only when their nnU-Net is told to use cuda (prediction is short)
GPU_RULES_ON_CPU_NODES = {"femur_mask", "bone_mask", "clinical_evaluate"}


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _profile(path):
    return yaml.safe_load(Path(path).read_text())


def _gpu_rules():
    """Rules of rules/*.smk whose resources declare gpu."""
    found = set()
    for smk in sorted((REPO / "rules").glob("*.smk")):
        rule = None
        for line in smk.read_text().splitlines():
            m = re.match(r"(?:rule|checkpoint) (\w+):", line) or re.match(r"use rule \w+ as (\w+) with:", line)
            if m:
                rule = m.group(1)
            elif rule and re.match(r"\s+gpu\s*=", line):
                found.add(rule)
    return found


def _rules():
    names = set()
    for smk in (REPO / "rules").glob("*.smk"):
        found = re.findall(r"^(?:rule|checkpoint) (\w+):|^use rule \w+ as (\w+) with:", smk.read_text(), flags=re.M)
        names |= {a or b for a, b in found}
    return names


# ------------------------------------------------------------------ the profiles (default suite)
def test_test_profile_is_the_h100_profile_with_only_site_values_changed():
    h100, test = _flat(_profile(H100)), _flat(_profile(TEST_PROFILE / "config.yaml"))
    changed = {k for k in h100.keys() | test.keys() if h100.get(k) != test.get(k)}
    not_site = {k for k in changed if not any(re.fullmatch(p, k) for p in SITE_KEYS)}
    assert not not_site, f"tests/slurm/profile differs from profiles/slurm-h100 in {sorted(not_site)}, which are no site values"
    # and the site values do differ: the test cluster is not the placeholder site
    assert test["default-resources.slurm_partition"] != h100["default-resources.slurm_partition"]
    assert "default-resources.slurm_account" in test


def test_h100_profile_sends_every_gpu_rule_to_the_gpu_partition():
    prof = _profile(H100)
    cpu_partition = prof["default-resources"]["slurm_partition"]
    sets = prof["set-resources"]
    gpu_rules = _gpu_rules()
    assert {"train_sr", "sr_infer", "nnunet_train", "bone_nnunet_train", "bone_mask"} <= gpu_rules
    for rule in sorted(gpu_rules - GPU_RULES_ON_CPU_NODES):
        res = sets.get(rule, {})
        assert res.get("slurm_partition") not in (None, cpu_partition), f"profiles/slurm-h100: rule {rule} declares gpu but has no GPU partition in set-resources"
        assert res.get("gpu_model") == "h100", f"profiles/slurm-h100: rule {rule}: gpu_model h100 missing"
        assert res.get("cpus_per_gpu", 0) >= 8, f"profiles/slurm-h100: rule {rule}: cpus_per_gpu missing"
    # GPU settings only on rules that exist and declare a GPU; portable resources stay in the rules
    assert set(sets) <= _rules(), f"profiles/slurm-h100 names unknown rules: {sorted(set(sets) - _rules())}"
    for rule, res in sets.items():
        if "gpu_model" in res:
            assert rule in gpu_rules, f"profiles/slurm-h100: {rule} gets a GPU model but declares no gpu"
    assert "gpu" not in prof["default-resources"] and "gpu_model" not in prof["default-resources"]
    assert prof["slurm-requeue"] is True and prof["retries"] >= 1


def test_workstation_profile_uses_all_cores_and_one_gpu_at_a_time():
    prof = _profile(REPO / "profiles" / "default" / "config.yaml")
    assert prof["cores"] == "all" and prof["resources"] == {"gpu": 1}
    assert "executor" not in prof


@pytest.mark.parametrize("profile", [H100.parent, TEST_PROFILE])
def test_slurm_profiles_are_valid_snakemake_settings(tmp_path, profile):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(_tiny_study()))
    res = run_snakemake(["-n", "--profile", str(profile), "--workflow-profile", "none", "--configfile", str(tmp_path / "config.yaml")], tmp_path, check=False)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert "synthesize_subject" in out and "train_sr" in out and "workflow specific profile" not in out


# ------------------------------------------------------------------ a real SLURM (pytest -m slurm)
TARGETS = ["results/split.tsv", "results/models/srgan_2d/record.json"]


def _tiny_study():
    """Two subjects through preprocessing (a third is the test subject, never made), the split and
    one SR model trained for 8 steps on the CPU, with a checkpoint after every step. The rules
    declare gpu=1 for the training (training.device: auto); it runs on the CPU, as auto finds
    no CUDA device there."""
    cfg = small_synthetic(n_subjects=3, scale=0.45, voxel=0.4)
    cfg["training"].update(models=["srgan"], samples_per_epoch=4, batch_size=2, validation_patches=2, checkpoint_every_steps=1)
    assert cfg["training"]["device"] == "auto"
    for phase in ("pretrain", "gan"):
        cfg["models"]["srgan"][phase]["epochs"] = 2
    return cfg


def _sh(cmd, timeout=120, check=True):
    res = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"`{cmd}` failed ({res.returncode}): {res.stdout[-2000:]} {res.stderr[-2000:]}")
    return res.stdout


@pytest.fixture(scope="module")
def slurm_cluster():
    """A running one-node SLURM (tests/slurm/setup_slurm.sh); stopped afterwards by
    tests/slurm/stop_slurm.sh (by PID) unless it was running before."""
    if os.geteuid() != 0:
        pytest.skip("the SLURM test installs packages and starts daemons: run it as root")
    if not os.environ.get("FEMURSR_SLURM_TEST"):
        pytest.skip("set FEMURSR_SLURM_TEST=1 to install and start a local SLURM for this test")
    t0 = time.time()
    res = subprocess.run(["bash", str(SLURM_DIR / "setup_slurm.sh")], capture_output=True, text=True, timeout=900)
    print(res.stdout, res.stderr)
    started = "already running" not in res.stdout
    try:
        assert res.returncode == 0, f"tests/slurm/setup_slurm.sh failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        print(f"SLURM up in {time.time() - t0:.0f} s")
        yield
    finally:
        if started:
            stop = subprocess.run(["bash", str(SLURM_DIR / "stop_slurm.sh")], capture_output=True, text=True, timeout=300)
            print(stop.stdout, stop.stderr)


def _squeue_job(workdir, rule):
    """(job id, state) of the job of ``rule`` that runs in ``workdir``, or None."""
    for line in _sh("squeue -h -o '%i|%T|%k|%Z'").splitlines():
        jobid, state, comment, wd = line.split("|", 3)
        if wd == str(workdir) and (comment == f"rule_{rule}" or comment.startswith(f"rule_{rule}_wildcards_")):
            return jobid, state
    return None


def _preempt_when_checkpointed(proc, workdir, checkpoint, log, rule="train_sr", timeout=600):
    """Requeue the running job of ``rule`` once its checkpoint exists, as a preemption with
    PreemptMode=REQUEUE does, and let it start again at once (SLURM holds a requeued job for
    two minutes otherwise). Returns the SLURM job id."""
    end = time.time() + timeout
    while time.time() < end and proc.poll() is None:
        job = _squeue_job(workdir, rule)
        if job and job[1] == "RUNNING" and checkpoint.is_file():
            jobid = job[0]
            _sh(f"scontrol requeue {jobid}")
            for _ in range(120):  # until the old allocation is gone
                if _sh(f"squeue -h -j {jobid} -o '%T %r'").split() == ["PENDING", "BeginTime"]:
                    break
                time.sleep(0.5)
            time.sleep(2)
            _sh(f"scontrol update JobId={jobid} StartTime=now")
            return jobid
        time.sleep(0.5)
    raise AssertionError(f"the {rule} job never ran with a checkpoint in {checkpoint.parent} (snakemake exit {proc.poll()}):\n{log.read_text()[-5000:]}")


def _sacct(run_id):
    """sacct lines (every record, requeues included) of the jobs of one Snakemake run."""
    fields = "JobID,JobName,Partition,Account,State,ExitCode,Elapsed,ReqTRES,AllocTRES,Comment"
    out = _sh(f"sacct -X -D -P -S now-6hours --name {run_id} -o {fields}")
    keys = fields.split(",")
    return out, [dict(zip(keys, line.split("|"))) for line in out.splitlines()[1:] if line]


def _job_counts(log):
    """Jobs per rule that a Snakemake run finished."""
    jobs = {}
    for rule in re.findall(r"Finished jobid: \d+ \(Rule: (\w+)\)", log):
        jobs[rule] = jobs.get(rule, 0) + 1
    return jobs


def _volatile(key):
    return "seconds" in key or key == "resumed_from_step"


def _clean_json(obj, workdir):
    """A JSON document without run times and with the work folder replaced."""
    if isinstance(obj, dict):
        return {k: _clean_json(v, workdir) for k, v in obj.items() if not _volatile(k)}
    if isinstance(obj, list):
        return [_clean_json(v, workdir) for v in obj]
    if isinstance(obj, str):
        return obj.replace(str(workdir), "<workdir>")
    return obj


def _same_output(path_a, path_b, dir_a, dir_b):
    """Whether two outputs hold the same result: bytes, or the same content where a file
    records run times, the work folder or compression times."""
    a, b = path_a.read_bytes(), path_b.read_bytes()
    if a == b:
        return True
    name = path_a.name
    if name.endswith(".gz"):
        return gzip.decompress(a) == gzip.decompress(b)
    if name.endswith(".json"):
        return _clean_json(json.loads(a), dir_a) == _clean_json(json.loads(b), dir_b)
    if name.endswith(".csv"):
        rows = [[r for r in x.decode().splitlines() if not re.search(r",[^,]*seconds[^,]*,", r)] for x in (a, b)]
        return rows[0] == rows[1]
    if name.endswith(".pt"):
        import torch

        sa, sb = (torch.load(p, map_location="cpu", weights_only=True) for p in (path_a, path_b))
        flat_a, flat_b = _flat_tensors(sa), _flat_tensors(sb)
        return flat_a.keys() == flat_b.keys() and all(_equal(flat_a[k], flat_b[k]) for k in flat_a)
    return False


def _flat_tensors(obj, prefix=""):
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flat_tensors(v, f"{prefix}{k}/"))
        return out
    return {prefix: obj}


def _equal(x, y):
    import torch

    if isinstance(x, torch.Tensor):
        return isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
    return x == y


def _outputs(root):
    """Outputs under results/, without the training's run folders (checkpoint, TensorBoard
    events named by host and time; not declared outputs)."""
    files = (p.relative_to(root) for p in (root / "results").rglob("*") if p.is_file())
    return sorted(f for f in files if not (f.parts[1] == "models" and f.parts[3:4] == ("run",)))


@pytest.mark.slurm
def test_demo_part_runs_through_slurm_like_a_local_run(slurm_cluster, tmp_path):
    t0 = time.time()
    cfg = _tiny_study()
    local, cluster = tmp_path / "local", tmp_path / "slurm"
    for d in (local, cluster):
        d.mkdir()
        (d / "config.yaml").write_text(yaml.safe_dump(cfg))

    # the reference: a local run (workstation profile) of the same targets
    res = run_snakemake(["-c2", *TARGETS, "--configfile", "config.yaml"], local)
    want_jobs = _job_counts(res.stdout + res.stderr)
    assert want_jobs.get("train_sr") == 1 and sum(want_jobs.values()) == 16, want_jobs
    t_local = time.time() - t0

    # the same through SLURM, with the test profile; the training is "preempted" once
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}
    cmd = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "-d", str(cluster), "--profile", str(TEST_PROFILE), "--workflow-profile", "none", *TARGETS, "--configfile", "config.yaml"]
    log = cluster / "snakemake.out"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cluster, stdout=out, stderr=subprocess.STDOUT, env=env, text=True)
        try:
            checkpoint = cluster / "results" / "models" / "srgan_2d" / "run" / "checkpoint.pt"
            preempted = _preempt_when_checkpointed(proc, cluster, checkpoint, log)
            rc = proc.wait(timeout=900)
        finally:
            if proc.poll() is None:  # stop it as Ctrl-C would: it cancels its SLURM jobs
                proc.send_signal(signal.SIGINT)
                proc.wait(timeout=120)
    text = log.read_text()
    assert rc == 0, f"snakemake --profile tests/slurm/profile failed ({rc}):\n{text[-5000:]}"
    run_id = re.search(r"SLURM run ID: (\S+)", text).group(1)
    table, records = _sacct(run_id)
    print(f"sacct of run {run_id}:\n{table}")

    # every job went through SLURM: as many as the local run had, each finally COMPLETED
    prof = _profile(TEST_PROFILE / "config.yaml")
    final = {}
    for r in records:
        final[r["JobID"]] = r  # with -D the last record of a job is its last run
    rules = {jid: r["Comment"][len("rule_"):].split("_wildcards_")[0] for jid, r in final.items()}
    counts = {}
    for rule in rules.values():
        counts[rule] = counts.get(rule, 0) + 1
    assert counts == want_jobs, f"jobs per rule through SLURM {counts}, local run {want_jobs}"
    for jid, r in final.items():
        rule = rules[jid]
        want_partition = prof["set-resources"].get(rule, {}).get("slurm_partition", prof["default-resources"]["slurm_partition"])
        assert r["State"] == "COMPLETED" and r["ExitCode"] == "0:0", f"SLURM job {jid} ({rule}): {r}"
        assert r["Partition"] == want_partition, f"SLURM job {jid} ({rule}) ran in {r['Partition']}, the profile asks for {want_partition}"
        assert r["Account"] == prof["default-resources"]["slurm_account"], r
        if rule == "train_sr":
            gpu = f"gres/gpu:{prof['set-resources'][rule]['gpu_model']}=1"
            assert gpu in r["ReqTRES"] and gpu in r["AllocTRES"], f"the training job has no {gpu}: {r}"
            assert f"cpu={prof['set-resources'][rule]['cpus_per_gpu']}" in r["AllocTRES"], r
        else:
            assert "gres/gpu" not in r["AllocTRES"], f"CPU job {jid} ({rule}) got a GPU: {r}"

    # the "preempted" training was requeued by SLURM (same job ID) and resumed from its checkpoint
    assert rules[preempted] == "train_sr"
    assert [r["State"] for r in records if r["JobID"] == preempted][:1] == ["REQUEUED"], table
    rec = json.loads((cluster / "results" / "models" / "srgan_2d" / "record.json").read_text())
    assert rec["resumed_from_step"] and 1 <= rec["resumed_from_step"] < rec["steps"] == 8, rec
    assert json.loads((local / "results" / "models" / "srgan_2d" / "record.json").read_text())["resumed_from_step"] is None

    # the outputs equal those of the local run
    files = _outputs(local)
    assert files == _outputs(cluster)
    assert any(f.suffix == ".pt" for f in files) and any(f.name.endswith(".nii.gz") for f in files)
    differ = [str(f) for f in files if not _same_output(local / f, cluster / f, local, cluster)]
    assert not differ, f"outputs of the SLURM run differ from the local run's: {differ}"
    print(f"local run {t_local:.0f} s, SLURM run and checks {time.time() - t0 - t_local:.0f} s; training requeued at step "
          f"{rec['resumed_from_step']} of {rec['steps']} and resumed; {len(files)} output files equal to the local run's")
