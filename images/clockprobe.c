/* clockprobe: the guest side of `vmjob smoke migrate`.
 *
 * Every 100 ms (absolute deadlines on CLOCK_MONOTONIC, so no drift accumulates) prints one line
 *     tick <counter> <tsc> <monotonic ns> <realtime ns>
 * with a single write(2), reading the TSC with RDTSC itself. Runs for argv[1] ticks
 * (default: forever). Built static by vmjobs/smoke.py and shipped as the job's input.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ __volatile__("lfence; rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}

static uint64_t ns(clockid_t clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

int main(int argc, char **argv)
{
    unsigned long long limit = argc > 1 ? strtoull(argv[1], NULL, 10) : 0;
    struct timespec next;
    char line[160];
    clock_gettime(CLOCK_MONOTONIC, &next);
    for (unsigned long long counter = 0; limit == 0 || counter < limit; counter++) {
        uint64_t tsc = rdtsc();
        uint64_t mono = ns(CLOCK_MONOTONIC);
        uint64_t real = ns(CLOCK_REALTIME);
        int n = snprintf(line, sizeof line, "tick %llu %llu %llu %llu\n", counter,
                         (unsigned long long)tsc, (unsigned long long)mono,
                         (unsigned long long)real);
        if (write(STDOUT_FILENO, line, (size_t)n) != n)
            return 1;
        next.tv_nsec += 100000000;
        if (next.tv_nsec >= 1000000000) {
            next.tv_nsec -= 1000000000;
            next.tv_sec += 1;
        }
        clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL);
    }
    return 0;
}
