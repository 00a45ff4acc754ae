"""Where a process runs on one thread: a sampler of its threads' states, attributed to the main thread's code.

    sampler = ThreadSampler(interval_s=0.002)
    with sampler:
        work()                        # the main thread's work, its kernels on worker threads
    sampler.table()                   # per function: seconds with 0, 1, 2+ threads running

Every interval the sampler reads the state of each thread of the process (/proc/self/task/*/stat;
"R" = running or runnable) and the main thread's Python stack (sys._current_frames). A sample with one
runnable thread is serial time: the other core has nothing to do. The count is of threads that WANT a
core, so it does not depend on other processes' load (a runnable thread waiting for a core still
counts), unlike wall-time ratios. Samples are attributed to the innermost frame of the main thread in
an npdiff module (function, file:line of its def), and to that frame's outermost npdiff caller below the
training entry (the block it belongs to). The sampler's own thread is left out of the count; it costs
~50 us per sample with the GIL (2.5% of a core at 2 ms).
"""

import os
import sys
import threading
import time
from collections import defaultdict


def runnable_threads(skip_tid):
    """Threads of this process in state R, the sampler's own left out."""
    count = 0
    for tid in os.listdir("/proc/self/task"):
        if int(tid) == skip_tid:
            continue
        try:
            with open(f"/proc/self/task/{tid}/stat", "rb") as stat:
                text = stat.read()
        except OSError:
            continue  # the thread ended meanwhile
        state = text[text.rindex(b")") + 2:text.rindex(b")") + 3]
        count += state == b"R"
    return count


def npdiff_frames(frame):
    """The main thread's frames in npdiff modules, innermost first: (function, file:first line)."""
    found = []
    while frame is not None:
        path = frame.f_code.co_filename
        if "/npdiff/" in path:
            where = path[path.rindex("/npdiff/") + 1:]
            found.append((frame.f_code.co_name, f"{where}:{frame.f_code.co_firstlineno}", frame.f_lineno))
        frame = frame.f_back
    return found


class ThreadSampler:
    def __init__(self, interval_s=0.002):
        self.interval_s = interval_s
        self.by_function = defaultdict(lambda: [0, 0, 0])  # innermost npdiff function -> samples at 0, 1, 2+
        self.by_line = defaultdict(lambda: [0, 0, 0])  # innermost npdiff line -> samples at 0, 1, 2+
        self.totals = [0, 0, 0]
        self.main_ident = threading.main_thread().ident
        self.stop = threading.Event()
        self.thread = None
        self.seconds = 0.0

    def run(self):
        own_tid = threading.get_native_id()
        while not self.stop.is_set():
            running = min(2, runnable_threads(own_tid))
            frame = sys._current_frames().get(self.main_ident)
            frames = npdiff_frames(frame) if frame is not None else []
            self.totals[running] += 1
            if frames:
                name, where, line = frames[0]
                self.by_function[f"{name} ({where})"][running] += 1
                self.by_line[f"{where.split(':')[0]}:{line} in {name}"][running] += 1
            else:
                self.by_function["(outside npdiff)"][running] += 1
            time.sleep(self.interval_s)

    def __enter__(self):
        self.start = time.perf_counter()
        self.thread = threading.Thread(target=self.run, name="thread-sampler", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.seconds = time.perf_counter() - self.start

    def share(self, counts):
        """Samples -> seconds, scaled so that all samples add up to the wall time sampled."""
        total = sum(self.totals) or 1
        return [self.seconds * c / total for c in counts]

    def table(self, top=25):
        zero, one, two = self.share(self.totals)
        print(f"sampled {self.seconds:.2f} s wall: {two:.2f} s with 2+ threads runnable, {one:.2f} s with one "
              f"(serial), {zero:.2f} s with none")
        for title, table in (("functions", self.by_function), ("lines", self.by_line)):
            print(f"  serial time by innermost npdiff {title} (s at 1 thread, s at 2+)")
            rows = sorted(table.items(), key=lambda item: -item[1][1])[:top]
            for key, counts in rows:
                _, one_s, two_s = self.share(counts)
                print(f"    {one_s:6.3f} {two_s:6.3f}  {key}")
        return {"wall_s": self.seconds, "serial_s": one, "parallel_s": two, "idle_s": zero,
                "by_function": {key: self.share(counts) for key, counts in self.by_function.items()},
                "by_line": {key: self.share(counts) for key, counts in self.by_line.items()}}
