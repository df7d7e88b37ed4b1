// A one-thread kernel that keeps its stream busy for `ns` nanoseconds (globaltimer), so the host can
// queue a whole measured sequence behind it: the timed region then starts with every launch already
// queued, and host launch gaps stay out of the numbers (tw/bench.py `hold`). It reads no memory.
extern "C" __global__ void hold(unsigned long long ns) {
  unsigned long long start, now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  do {
    __nanosleep(1000);
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  } while (now - start < ns);
}
