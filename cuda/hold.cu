// A one-thread kernel that keeps its stream busy for `ns` nanoseconds (globaltimer), so the host can
// queue a whole measured sequence behind it: the timed region then starts with every launch already
// queued, and host launch gaps stay out of the numbers (tw/measure/bench.py `hold`). It reads no memory.
extern "C" __global__ void hold(unsigned long long ns) {
  unsigned long long start, now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  do {
    __nanosleep(1000);
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  } while (now - start < ns);
}

// The same, as clusters of 2 CTAs (grid a multiple of 2): a cluster's CTAs are co-scheduled on SMs of one
// GPC, so k held SMs come as k/2 pairs (tw/bench.hold_sms cluster=2, experiments/sm_share.py --beside
// pairs: do held SMs cost a GEMM of 2-CTA clusters less when they are taken in pairs?).
extern "C" __global__ void __cluster_dims__(2, 1, 1) hold_pair(unsigned long long ns) {
  unsigned long long start, now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  do {
    __nanosleep(1000);
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  } while (now - start < ns);
}
