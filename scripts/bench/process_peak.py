"""Wall time and peak resident memory of one command, run in a child process of its own (so that its maximum RSS is
the command's alone). Shared by the benchmarks that report a command's time and memory."""
import subprocess
import sys


def measured(args):
    """(seconds, peak RSS in bytes) of `args`; SystemExit when the command fails."""
    code = ("import resource, subprocess, sys, time; t = time.time(); "
            "p = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL); "
            "print(time.time() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, p.returncode)")
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True).stdout.split()
    if out[2] != "0":
        raise SystemExit(f"{' '.join(args)} failed")
    return float(out[0]), int(out[1])
