"""``hpo agent -- COMMAND …``: run any program once per trial, in any language.

For each leased trial the agent starts ``COMMAND`` in its own process group with:

* ``HPO_CONFIG_FILE``: a JSON file holding the trial's full config (``TrainConfig`` fields);
  ``HPO_PARAMS``: the sampled parameters as JSON; ``HPO_CONFIG_<FIELD>`` for each config field
  (strings as they are, everything else as JSON: ``HPO_CONFIG_BASE_LR=0.001``,
  ``HPO_CONFIG_HIDDEN_SIZES=[512, 256]``); ``HPO_STUDY``, ``HPO_TRIAL_ID``, ``HPO_TRIAL_NUMBER``,
  ``HPO_REPORT_METRIC`` and ``HPO_OBJECTIVE_METRICS``.
* ``HPO_METRICS_FD`` (always 3: ``echo '{…}' >&3``): a pipe for metrics, one JSON object a
  line. A line ``HPO_METRIC {…}`` on stdout counts the same.
  ``{"epoch": 3, "value": 142.7, "val_kl": 12.1}`` is a report (``value`` may instead be
  given under the report metric's name, e.g. ``"val_neg_elbo"``);
  ``{"final": true, "val_neg_elbo": 139.4, …}`` is the result.
* ``HPO_LEASE`` (the lease as JSON), ``HPO_SERVER_URL`` and ``HPO_WORKER_TOKEN``, so a Python
  program may use ``hpo_service.sdk.trials()`` instead: it then reports and settles the trial
  itself, and the agent only watches it.

Settling, by what happened:

* the pruner says *prune* at a report → the group gets ``--prune-signal`` (SIGTERM), then
  SIGKILL after ``--grace`` seconds if anything in it still runs; the trial is told PRUNED;
* the study is cancelled (a heartbeat or report says *stop*) → the group is killed the same
  way; the trial fails for good;
* exit code 0 → ``complete`` with the ``final`` line's objective metrics or, without one, the
  last reported value; any other exit (or death by a signal) → ``fail`` with the exit status;
* the agent itself gets SIGINT/SIGTERM → the group is killed and the trial is handed back with
  ``retryable`` (a retry with the same parameters is queued at once).

The last ``--tail-lines`` lines of the program's output (stdout and stderr together, which the
agent also echoes) are stored with the trial as the user attribute ``output_tail`` (at most
4,000 characters), whatever the outcome; a failure's reason repeats them, cut to the 2,000
characters the server keeps of a reason.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Annotated, Any

import typer

from hpo_service.client import HPOClient, LeaseLost, NoWork, make_http_client
from hpo_service.schemas import OUTPUT_TAIL_CHARS, Lease
from hpo_service.sdk import REASON_CHARS, WorkerShutdown, _number, _retrying
from hpo_service.task_watch import TaskWatch

log = logging.getLogger("hpo.agent")

METRIC_PREFIX = "HPO_METRIC "
#: A line the SDK writes on ``HPO_METRICS_FD`` once it has settled the trial itself.
SDK_SETTLED_KEY = "sdk_settled"


@dataclass
class AgentOptions:
    command: Sequence[str]
    worker_id: str
    wait_s: float = 20.0
    max_trials: int | None = None
    idle_exit_s: float | None = None
    exit_when_idle: bool = False  # exit once the server says no study can give work now
    grace_s: float = 10.0  # after the prune/cancel signal, before SIGKILL
    prune_signal: signal.Signals = signal.SIGTERM
    tail_lines: int = 40
    server_url: str = ""
    token: str | None = None
    echo: Callable[[str], None] = print


@dataclass
class _Run:
    """What one trial's program has done so far, as the agent's main thread sees it."""

    lease: Lease
    process: subprocess.Popen[bytes]
    events: queue.Queue[dict[str, Any]] = field(default_factory=queue.Queue)
    tail: collections.deque[str] = field(default_factory=collections.deque)
    last_value: float | None = None
    last_metrics: dict[str, Any] = field(default_factory=dict)
    final: dict[str, Any] | None = None
    pruned_at: int | None = None
    stop_reason: str | None = None  # the study was cancelled
    lost: str | None = None  # the lease is gone
    sdk_outcome: str | None = None
    interrupted: str | None = None  # the agent was told to shut down
    killed_after_grace: bool = False
    signalled_at: float | None = None


def config_environment(lease: Lease, config_file: Path) -> dict[str, str]:
    """The variables a trial's program gets, besides the agent's own environment."""
    env = {
        "HPO_CONFIG_FILE": str(config_file),
        "HPO_PARAMS": json.dumps(lease.params),
        "HPO_STUDY": lease.study,
        "HPO_TRIAL_ID": str(lease.trial_id),
        "HPO_TRIAL_NUMBER": str(lease.trial_number),
        "HPO_REPORT_METRIC": lease.report_metric or "",
        "HPO_OBJECTIVE_METRICS": ",".join(lease.objective_metrics),
        "HPO_LEASE": lease.model_dump_json(),
    }
    for name, value in lease.config.items():
        env[f"HPO_CONFIG_{name.upper()}"] = value if isinstance(value, str) else json.dumps(value)
    return env


#: The program's end of the metrics pipe: 3, so that ``echo … >&3`` works in any shell (dash
#: refuses descriptors above 9, and the agent's own pipe may land on any number).
METRICS_FD = 3


def _metrics_fd_shim(write_fd: int) -> list[str]:
    """A Python prefix that moves the pipe from ``write_fd`` to fd 3, then execs the program
    (``subprocess`` keeps passed descriptors at their own numbers)."""
    code = (
        "import os, sys; w = int(sys.argv[1]); os.dup2(w, 3); "
        "w != 3 and os.close(w); os.execvp(sys.argv[2], sys.argv[2:])"
    )
    return [sys.executable, "-c", code, str(write_fd)]


class Agent:
    def __init__(self, client: HPOClient, options: AgentOptions) -> None:
        self.client = client
        self.options = options
        self._shutdown: str | None = None
        self.trials_done = 0
        self.last_reason: str | None = None  # why the last trial ended as it did

    def request_shutdown(self, why: str) -> None:
        self._shutdown = why

    def run(self) -> int:
        """Lease and run until shutdown, ``max_trials``, ``idle_exit_s`` or (``exit_when_idle``)
        no study can give work; returns trials run.

        SIGINT and SIGTERM (main thread only) hand the running trial back and end the loop.
        """
        handlers: dict[signal.Signals, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            return self._loop()
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.request_shutdown(signal.Signals(signum).name)

    def _loop(self) -> int:
        idle_since = time.monotonic()
        opts = self.options
        watch = TaskWatch(self.client)  # says what it waits on that only hpo-worker runs
        while self._shutdown is None:
            if opts.max_trials is not None and self.trials_done >= opts.max_trials:
                break
            try:
                lease = _retrying(
                    "lease", lambda: self.client.next_lease(opts.worker_id, opts.wait_s)
                )
            except (KeyboardInterrupt, WorkerShutdown):
                break
            if isinstance(lease, NoWork):
                for line in watch.waited():
                    opts.echo(f"[hpo agent] {line}")
                if lease.idle and opts.exit_when_idle:
                    log.info("no study can give work now; exiting")
                    break
                if (
                    opts.idle_exit_s is not None
                    and time.monotonic() - idle_since >= opts.idle_exit_s
                ):
                    log.info("no work for %.0fs; exiting", opts.idle_exit_s)
                    break
                continue
            if self._shutdown is not None:  # the signal came during the long-poll
                outcome = self._fail(
                    lease, f"agent got {self._shutdown}; handed back for retry", retryable=True
                )
            else:
                outcome = self.run_trial(lease)
            opts.echo(
                f"[hpo agent] trial {lease.trial_number} of {lease.study}: {outcome}"
                + (f" ({self.last_reason})" if self.last_reason else "")
            )
            self.trials_done += 1
            idle_since = time.monotonic()
            watch.worked()
        return self.trials_done

    # --- one trial --------------------------------------------------------------------------

    def run_trial(self, lease: Lease) -> str:
        """Run the command for one trial and settle it. Returns the outcome."""
        with tempfile.TemporaryDirectory(prefix=f"hpo-trial-{lease.trial_id}-") as folder:
            config_file = Path(folder) / "config.json"
            config_file.write_text(json.dumps(lease.config, indent=2))
            read_fd, write_fd = os.pipe()
            env = {
                **os.environ,
                **config_environment(lease, config_file),
                "HPO_METRICS_FD": str(METRICS_FD),
                "HPO_SERVER_URL": self.options.server_url,
            }
            if self.options.token:
                env["HPO_WORKER_TOKEN"] = self.options.token
            try:
                process = subprocess.Popen(
                    [*_metrics_fd_shim(write_fd), *self.options.command],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    pass_fds=(write_fd,),
                    start_new_session=True,  # its own process group: prune and cancel kill it all
                )
            except OSError as error:
                os.close(read_fd)
                return self._fail(lease, f"cannot start {self.options.command[0]!r}: {error}")
            finally:
                os.close(write_fd)  # the program holds the write end now
            run = _Run(lease, process, tail=collections.deque(maxlen=self.options.tail_lines))
            return self._watch(run, read_fd)

    def _watch(self, run: _Run, read_fd: int) -> str:
        assert run.process.stdout is not None
        readers = [
            threading.Thread(target=self._read_output, args=(run, run.process.stdout), daemon=True),
            threading.Thread(
                target=self._read_metrics, args=(run, os.fdopen(read_fd, "rb")), daemon=True
            ),
        ]
        done = threading.Event()
        beat = threading.Thread(target=self._heartbeat_loop, args=(run, done), daemon=True)
        for thread in (*readers, beat):
            thread.start()
        exited_at: float | None = None
        try:
            while True:
                with contextlib.suppress(queue.Empty):
                    self._handle(run, run.events.get(timeout=0.1))
                self._enforce(run)
                if run.process.poll() is None:
                    continue
                if not any(t.is_alive() for t in readers):
                    break
                # The program exited but something it started still holds its output open:
                # give it the grace period, then kill the group; never wait forever on it.
                exited_at = exited_at or time.monotonic()
                lingering = time.monotonic() - exited_at
                if lingering >= self.options.grace_s:
                    self._kill_group(run.process, signal.SIGKILL)
                if lingering >= self.options.grace_s + 5:
                    log.warning("trial %d: output still open after exit", run.lease.trial_number)
                    break
            while not run.events.empty():
                self._handle(run, run.events.get_nowait())
        finally:
            done.set()
            if run.process.poll() is None:  # only when the agent itself fails here
                self._kill_group(run.process, signal.SIGKILL)
                run.process.wait()
        beat.join(timeout=10)
        return self._settle(run)

    def _read_output(self, run: _Run, stream: IO[bytes]) -> None:
        for raw in stream:
            line = raw.decode(errors="replace").rstrip("\n")
            run.tail.append(line)
            self.options.echo(line)
            if line.startswith(METRIC_PREFIX):
                self._parse(run, line[len(METRIC_PREFIX) :], "stdout")

    def _read_metrics(self, run: _Run, stream: IO[bytes]) -> None:
        with stream:
            for raw in stream:
                self._parse(run, raw.decode(errors="replace"), "HPO_METRICS_FD")

    def _parse(self, run: _Run, text: str, where: str) -> None:
        if not text.strip():
            return
        try:
            event = json.loads(text)
            if not isinstance(event, dict):
                raise ValueError("not a JSON object")
        except ValueError as error:
            log.warning("ignored a metrics line on %s (%s): %.200s", where, error, text)
            return
        if SDK_SETTLED_KEY in event:  # set here, not queued: the heartbeat thread reads it
            run.sdk_outcome = str(event[SDK_SETTLED_KEY])
            return
        run.events.put(event)

    def _handle(self, run: _Run, event: dict[str, Any]) -> None:
        try:
            if event.get("final"):
                run.final = {k: _number(k, v) for k, v in event.items() if k != "final"}
            elif "epoch" in event:
                self._report(run, event)
            else:
                log.warning("ignored a metrics line with neither `epoch` nor `final`: %s", event)
        except (TypeError, ValueError) as error:
            log.warning("ignored a metrics line (%s): %s", error, event)

    def _report(self, run: _Run, event: dict[str, Any]) -> None:
        if run.pruned_at is not None or run.stop_reason or run.lost or run.sdk_outcome:
            return  # the program is being stopped: later reports change nothing
        epoch = int(event["epoch"])
        metric = run.lease.report_metric
        value = event.get("value", event.get(metric) if metric else None)
        value = float(value) if value is not None else None
        sent = value if value is not None and math.isfinite(value) else None
        metrics = {k: _number(k, v) for k, v in event.items() if k not in ("epoch", "value")}
        try:
            answer = _retrying(
                "report",
                lambda: self.client.report(
                    run.lease.trial_id, run.lease.lease_token, epoch, sent, metrics
                ),
            )
        except LeaseLost as error:
            run.lost = str(error)  # _enforce stops the program
            return
        run.last_value, run.last_metrics = sent, metrics
        if answer.action == "prune":
            run.pruned_at = epoch
            self._signal(run, self.options.prune_signal)
        elif answer.action == "stop":
            run.stop_reason = answer.reason or "stopped by the server"
            self._signal(run, self.options.prune_signal)

    def _heartbeat_loop(self, run: _Run, done: threading.Event) -> None:
        while not done.wait(run.lease.heartbeat_interval_s):
            if run.sdk_outcome:
                return
            try:
                answer = self.client.heartbeat(run.lease.trial_id, run.lease.lease_token)
            except LeaseLost as error:
                if not run.sdk_outcome:
                    run.lost = str(error)
                return
            except Exception as error:  # unreachable server: keep the trial, keep beating
                log.warning("heartbeat: %s", error)
                continue
            if answer.action == "stop" and run.stop_reason is None:
                run.stop_reason = answer.reason or "stopped by the server"

    # --- stopping the program ---------------------------------------------------------------

    @staticmethod
    def _kill_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)

    def _signal(self, run: _Run, sig: signal.Signals) -> None:
        if run.signalled_at is None or sig == signal.SIGKILL:
            self._kill_group(run.process, sig)
            run.signalled_at = run.signalled_at or time.monotonic()

    def _enforce(self, run: _Run) -> None:
        """Turn flags set by other threads into signals; SIGKILL once the grace is over."""
        if self._shutdown is not None and run.interrupted is None:
            run.interrupted = self._shutdown
            self._signal(run, signal.SIGTERM)
        stopping = run.stop_reason is not None or run.lost is not None
        if stopping and run.sdk_outcome is None:
            self._signal(run, self.options.prune_signal)
        if (
            run.signalled_at is not None
            and not run.killed_after_grace
            and time.monotonic() - run.signalled_at >= self.options.grace_s
        ):
            # Also when the leader has exited: its children may still hold the output open.
            run.killed_after_grace = True
            self._kill_group(run.process, signal.SIGKILL)

    # --- settling ---------------------------------------------------------------------------

    def _exit_status(self, run: _Run) -> str:
        code = run.process.returncode
        if code is not None and code < 0:
            status = f"killed by {signal.Signals(-code).name}"
        else:
            status = f"exit code {code}"
        if run.killed_after_grace:
            status += f" (SIGKILL to its group after a {self.options.grace_s:g}s grace)"
        return status

    def _with_tail(self, head: str, run: _Run) -> str:
        tail = "\n".join(run.tail)
        room = REASON_CHARS - len(head) - 30
        if not tail or room <= 0:
            return head
        return f"{head}\n--- last output ---\n{tail[-room:]}"

    def _settle(self, run: _Run) -> str:
        lease, status = run.lease, self._exit_status(run)
        self.last_reason = status
        if run.sdk_outcome is not None:
            return f"settled by the program through the SDK; {status}"
        if run.pruned_at is not None:  # first: the prune answer ended the trial PRUNED
            reason = f"pruned at epoch {run.pruned_at}; {status}"
            return self._fail(lease, reason, pruned=True, tail=_tail(run))
        if run.lost is not None:
            log.warning("trial %d: lease lost (%s)", lease.trial_number, run.lost)
            return "lost"
        if run.stop_reason is not None:
            return self._fail(lease, f"{run.stop_reason}; {status}", tail=_tail(run))
        if run.interrupted is not None:
            reason = f"agent got {run.interrupted}; handed back for retry ({status})"
            return self._fail(lease, reason, retryable=True, tail=_tail(run))
        if run.process.returncode != 0:
            head = f"program failed: {status}"
            return self._fail(lease, self._with_tail(head, run), tail=_tail(run))
        return self._complete(run)

    def _complete(self, run: _Run) -> str:
        lease, names = run.lease, run.lease.objective_metrics
        final = run.final
        if final is None and len(names) == 1 and run.last_value is not None:
            final = {**run.last_metrics, names[0]: run.last_value}
        missing = [n for n in names if not isinstance((final or {}).get(n), float)]
        if final is None or missing:
            head = f"the program exited 0 without a result for {missing or names}"
            return self._fail(lease, self._with_tail(head, run), tail=_tail(run))
        values = [float(final[n]) for n in names]
        if not all(math.isfinite(v) for v in values):
            head = f"objective not finite: {values}"
            return self._fail(lease, self._with_tail(head, run), tail=_tail(run))
        scalars = {k: v for k, v in final.items() if isinstance(v, float) and math.isfinite(v)}
        try:
            _retrying(
                "complete",
                lambda: self.client.complete(
                    lease.trial_id, lease.lease_token, values, scalars, output_tail=_tail(run)
                ),
            )
        except LeaseLost as error:
            log.warning("trial %d: result refused: %s", lease.trial_number, error)
            return "lost"
        return "complete"

    def _fail(
        self,
        lease: Lease,
        reason: str,
        *,
        retryable: bool = False,
        pruned: bool = False,
        tail: str | None = None,
    ) -> str:
        self.last_reason = reason.split("\n", 1)[0]
        try:
            _retrying(
                "fail",
                lambda: self.client.fail(
                    lease.trial_id,
                    lease.lease_token,
                    reason[:REASON_CHARS],
                    retryable=retryable,
                    pruned=pruned,
                    output_tail=tail,
                ),
            )
        except LeaseLost as error:
            log.warning("trial %d: could not settle: %s", lease.trial_number, error)
            return "lost"
        return "pruned" if pruned else ("handed back" if retryable else "failed")


def _tail(run: _Run) -> str | None:
    """The program's last output lines as stored with the trial (``output_tail``)."""
    text = "\n".join(run.tail)
    return text[-OUTPUT_TAIL_CHARS:] or None


# --- the `hpo agent` command (registered in hpo_service.cli) -----------------------------------


def agent_command(
    command: Annotated[
        list[str], typer.Argument(help="The program and its arguments, after `--`.")
    ],
    server: Annotated[
        str, typer.Option("--server", envvar="HPO_SERVER_URL", help="Base URL of the server.")
    ] = "http://127.0.0.1:8000",
    token: Annotated[
        str | None, typer.Option("--token", envvar="HPO_WORKER_TOKEN", help="Worker token.")
    ] = None,
    worker_id: Annotated[
        str | None, typer.Option("--worker-id", envvar="HPO_WORKER_ID", help="Stable id.")
    ] = None,
    max_trials: Annotated[
        int | None, typer.Option("--max-trials", help="Exit after this many trials.")
    ] = None,
    idle_exit_s: Annotated[
        float | None, typer.Option("--idle-exit", help="Exit after this long without work (s).")
    ] = None,
    exit_when_idle: Annotated[
        bool,
        typer.Option(
            "--exit-when-idle",
            help="Exit once the server says no study can give work now (every study stopped, "
            "cancelled, completed or failed, or none).",
        ),
    ] = False,
    grace_s: Annotated[
        float, typer.Option("--grace", help="Seconds from the prune/cancel signal to SIGKILL.")
    ] = 10.0,
    prune_signal: Annotated[
        str, typer.Option("--prune-signal", help="Signal that asks the program to stop.")
    ] = "SIGTERM",
    tail_lines: Annotated[
        int, typer.Option("--tail-lines", help="Output lines kept with a failed trial.")
    ] = 40,
    wait_s: Annotated[float, typer.Option("--wait", help="Long-poll per lease request (s).")] = 20,
) -> None:
    """Run COMMAND once per trial: config in HPO_CONFIG_FILE and HPO_CONFIG_* variables,
    metrics back as JSON lines on HPO_METRICS_FD or `HPO_METRIC {...}` stdout lines."""
    try:
        sig = signal.Signals[prune_signal.upper()]
    except KeyError:
        raise typer.BadParameter(
            f"unknown signal {prune_signal!r}", param_hint="--prune-signal"
        ) from None
    if grace_s < 0:
        raise typer.BadParameter("must be >= 0", param_hint="--grace")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    options = AgentOptions(
        command=command,
        worker_id=worker_id or f"agent-{os.uname().nodename}-{os.getpid()}",
        wait_s=wait_s,
        max_trials=max_trials,
        idle_exit_s=idle_exit_s,
        exit_when_idle=exit_when_idle,
        grace_s=grace_s,
        prune_signal=sig,
        tail_lines=tail_lines,
        server_url=server,
        token=token,
    )
    done = Agent(HPOClient(make_http_client(server, token)), options).run()
    print(f"[hpo agent] {done} trial(s) run")
