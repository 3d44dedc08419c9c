/* vmjob-resume: the guest side of a warm start (vmjobs/template.py, images/init).
 *
 *     vmjob-resume SEC NSEC < SEED
 *
 * A job's guest restored from a template carries the template's clock and the template's
 * random state. Run by the init before the job, this sets CLOCK_REALTIME to SEC.NSEC (the
 * host's time, sent with the job) and mixes SEED (128 hex digits: 64 bytes from the host's
 * CSPRNG) into the kernel's input pool, credited as 512 bits (RNDADDENTROPY), then reseeds the
 * CRNG from the pool at once (RNDRESEEDCRNG). Without the reseed the kernel would keep the
 * template's CRNG key until its next scheduled reseed (seconds to a minute, random.c
 * crng_has_old_seed), so two jobs from one template would read the same /dev/urandom bytes.
 * Busybox has no way to make these ioctls, hence this helper. Exit 0 only if all three
 * succeeded; a message on stderr otherwise. Built static by vmjobs/cbuild.py.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/random.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#define SEED_BYTES 64

static int fail(const char *what)
{
    fprintf(stderr, "vmjob-resume: %s: %s\n", what, strerror(errno));
    return 1;
}

static int digits(const char *text, long long *value, long long max)
{
    long long v = 0;
    if (!*text)
        return -1;
    for (; *text; text++) {
        if (*text < '0' || *text > '9' || v > (max - (*text - '0')) / 10)
            return -1;
        v = v * 10 + (*text - '0');
    }
    *value = v;
    return 0;
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1;
}

int main(int argc, char **argv)
{
    long long sec, nsec;
    char hex[2 * SEED_BYTES];
    size_t got = 0;
    union {
        struct rand_pool_info info;
        unsigned char raw[sizeof(struct rand_pool_info) + SEED_BYTES];
    } pool;

    if (argc != 3 || digits(argv[1], &sec, 1LL << 40) || digits(argv[2], &nsec, 999999999)) {
        fprintf(stderr, "usage: vmjob-resume SEC NSEC < SEED (128 hex digits)\n");
        return 2;
    }
    while (got < sizeof hex) {
        ssize_t n = read(0, hex + got, sizeof hex - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            fprintf(stderr, "vmjob-resume: the seed is shorter than %d hex digits\n",
                    2 * SEED_BYTES);
            return 2;
        }
        got += (size_t)n;
    }
    memset(&pool, 0, sizeof pool);
    for (int i = 0; i < SEED_BYTES; i++) {
        int hi = hexval(hex[2 * i]), lo = hexval(hex[2 * i + 1]);
        if (hi < 0 || lo < 0) {
            fprintf(stderr, "vmjob-resume: the seed is not lowercase hex\n");
            return 2;
        }
        /* the flexible member buf[] starts right after the struct's fixed fields */
        pool.raw[sizeof(struct rand_pool_info) + i] = (unsigned char)(hi << 4 | lo);
    }
    pool.info.entropy_count = SEED_BYTES * 8;
    pool.info.buf_size = SEED_BYTES;

    struct timespec now = {.tv_sec = (time_t)sec, .tv_nsec = (long)nsec};
    if (clock_settime(CLOCK_REALTIME, &now) != 0)
        return fail("clock_settime");
    int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return fail("open /dev/urandom");
    if (ioctl(fd, RNDADDENTROPY, &pool.info) != 0)
        return fail("RNDADDENTROPY");
    if (ioctl(fd, RNDRESEEDCRNG) != 0)
        return fail("RNDRESEEDCRNG");
    memset(&pool, 0, sizeof pool);
    memset(hex, 0, sizeof hex);
    close(fd);
    return 0;
}
