"""Live progress of a run launched from a notebook kernel: a 2-process (torchrun) pre-training started by `launch()` in a
kernel driven by nbclient. Every message the kernel sends is time-stamped as it arrives, so the test sees *when* the
progress bar, the loss plot and the `[progress]` lines changed — before the launching cell finished, not after."""

import json
import re
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

STEPS = 24


class RecordingClient(nbclient.NotebookClient):
    "nbclient that keeps (arrival time, cell index, message) for every kernel message, and each cell's end time."

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.seen, self.done = [], {}
        self.on_cell_executed = lambda cell, cell_index, execute_reply: self.done.__setitem__(
            cell_index, time.monotonic()
        )

    def process_message(self, msg, cell, cell_index):
        self.seen.append((time.monotonic(), cell_index, msg))
        return super().process_message(msg, cell, cell_index)


@pytest.mark.two_cores  # two processes / a browser: see tests/conftest.py
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_process_run_shows_live_progress_in_a_notebook(tmp_path):
    out = tmp_path / "run"
    setup = f"""from maskedclip.train import experiment_config, ensure_synthetic_corpus, launch
cfg = experiment_config("tiny", "maskedclip", steps={STEPS}, synthetic_n_paired=32, synthetic_n_unpaired=32, synthetic_n_task=8,
                        paired_batch_size=4, unpaired_batch_size=4, warmup_steps=1, output_dir={str(out)!r},
                        synthetic_dir={str(tmp_path / "corpus")!r})
cfg = cfg.replace(data=cfg.data.replace(synthetic_dir=str(ensure_synthetic_corpus(cfg))))"""
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell(setup),
            nbformat.v4.new_code_cell("rc = launch(cfg, nproc=2)\nassert rc == 0, rc"),
        ]
    )
    nb.metadata["kernelspec"] = dict(name="python3", display_name="Python 3", language="python")
    client = RecordingClient(
        nb, timeout=540, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    end = client.done[1]
    during = [(t, m) for t, i, m in client.seen if i == 1 and t < end]
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert "world_size=2" in (out / "train.log").read_text()

    # the plain lines: several distinct steps, streamed while the run was still going
    text = "".join(m["content"].get("text", "") for _, m in during if m["msg_type"] == "stream")
    steps = [int(s) for s in re.findall(r"\[progress\] step (\d+)/%d" % STEPS, text)]
    assert steps == sorted(steps) and steps[-1] == STEPS and len(set(s for s in steps if s < STEPS)) >= 3, (
        text[-2000:]
    )

    # the widgets: a progress bar whose value moved through several steps, and a loss plot redrawn several times
    opened = {
        m["content"]["comm_id"]: m["content"]["data"]["state"]
        for _, m in during
        if m["msg_type"] == "comm_open"
    }
    bars = {cid for cid, st in opened.items() if st.get("_model_name") == "FloatProgressModel"}
    figs = {cid for cid, st in opened.items() if "_widget_data" in st}
    assert len(bars) == 1 and len(figs) == 1, {cid: st.get("_model_name") for cid, st in opened.items()}
    updates = [
        (t, m["content"]["comm_id"], m["content"]["data"].get("state", {}))
        for t, m in during
        if m["msg_type"] == "comm_msg"
    ]
    bar_values = [st["value"] for _, cid, st in updates if cid in bars and "value" in st]
    assert len(set(v for v in bar_values if 0 < v < STEPS)) >= 3, (
        bar_values
    )  # seen mid-run, not only at the end
    assert bar_values[-1] == STEPS
    redraws = [
        t for t, cid, st in updates if cid in figs and any(k.startswith("_py2js_") and st[k] for k in st)
    ]
    assert len(redraws) >= 3, f"the loss plot was redrawn {len(redraws)} times"
    # and those redraws were spread over the run: the first well before the cell ended
    assert end - redraws[0] > 1.0
