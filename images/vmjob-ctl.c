/* vmjob-ctl: a gang member's coordination with its gang, through the daemon, over the
 * virtio-serial port org.vmjobs.ctl.0 (no network needed). See docs/multinode.md.
 *
 *     vmjob-ctl barrier NAME [--timeout SECONDS]
 *     vmjob-ctl baton take|pass NAME
 *     vmjob-ctl kv set KEY VALUE
 *     vmjob-ctl kv get KEY [--wait]
 *     vmjob-ctl nodes
 *     vmjob-ctl poison REASON...
 *     vmjob-ctl ended STATUS          (the init's: the job exited with STATUS; non-zero poisons)
 *     vmjob-ctl resize [--cpus N] [--mem MIB]   (a resizable job, when the admin allows it)
 *
 * One request line "ID VERB ARGS\n" (ID: letters and digits, unique per call), answered by
 * "ID data TEXT" lines (nodes) and one "ID ok [TEXT]" or "ID err TEXT" (vmjobs/control.py).
 * Lines with another ID (answers to an earlier, interrupted call) are skipped. Until the first
 * line for its ID comes, the request is sent again after 0.5, 1, 2, 4, 5, 5... s: the host
 * side may not be listening yet (the daemon attaches after the guest starts, and again after a
 * migration); the daemon answers a repeated ID once. The port can be open by one process at a
 * time: a second vmjob-ctl waits for it.
 *
 * Exit 0 on ok (kv get prints the value, resize what the guest now has, nodes one line per
 * member), 1 on err with the
 * host's message on stderr, 2 on usage errors, 3 if the guest has no control port.
 * Built static by vmjobs/cbuild.py.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define PORT_NAME "org.vmjobs.ctl.0"
#define MAX_LINE 512

static int usage(void)
{
    fputs("usage: vmjob-ctl barrier NAME [--timeout SECONDS] | baton take|pass NAME |\n"
          "       kv set KEY VALUE | kv get KEY [--wait] | nodes | poison REASON... |\n"
          "       resize [--cpus N] [--mem MIB]\n",
          stderr);
    return 2;
}

static int find_port(char *path, size_t size)
{
    DIR *dir = opendir("/sys/class/virtio-ports");
    struct dirent *entry;
    if (!dir)
        return -1;
    while ((entry = readdir(dir))) {
        char name_path[300], name[64] = "";
        FILE *f;
        if (entry->d_name[0] == '.')
            continue;
        snprintf(name_path, sizeof name_path, "/sys/class/virtio-ports/%s/name", entry->d_name);
        f = fopen(name_path, "r");
        if (!f)
            continue;
        if (fgets(name, sizeof name, f))
            name[strcspn(name, "\n")] = 0;
        fclose(f);
        if (!strcmp(name, PORT_NAME)) {
            snprintf(path, size, "/dev/%s", entry->d_name);
            closedir(dir);
            return 0;
        }
    }
    closedir(dir);
    return -1;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int append(char *buf, size_t *len, const char *word)
{
    size_t n = strlen(word);
    if (*len + n + 2 > MAX_LINE)
        return -1;
    if (*len)
        buf[(*len)++] = ' ';
    memcpy(buf + *len, word, n);
    *len += n;
    buf[*len] = 0;
    return 0;
}

static int write_all(int fd, const char *data, size_t len)
{
    while (len) {
        ssize_t n = write(fd, data, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        data += n;
        len -= (size_t)n;
    }
    return 0;
}

int main(int argc, char **argv)
{
    char line[MAX_LINE + 2] = "", id[32], port[300];
    size_t len = 0;
    int i, fd, verb_kv_get = 0;
    int print_ok = 0; /* print the text of "ok" (kv get, resize) */

    if (argc < 2)
        return usage();
    snprintf(id, sizeof id, "c%ldx%ld", (long)getpid(), (long)time(NULL));
    append(line, &len, id);
    if (!strcmp(argv[1], "barrier")) {
        long ms = 0;
        if (argc != 3 && !(argc == 5 && !strcmp(argv[3], "--timeout")))
            return usage();
        if (argc == 5) {
            char *end;
            double s = strtod(argv[4], &end);
            if (*end || !(s > 0) || s > 7 * 24 * 3600.0)
                return usage();
            ms = (long)(s * 1000 + 0.5);
            if (ms < 1)
                ms = 1;
        }
        char ms_text[32];
        snprintf(ms_text, sizeof ms_text, "%ld", ms);
        if (append(line, &len, "barrier") || append(line, &len, argv[2]) ||
            append(line, &len, ms_text))
            return usage();
    } else if (!strcmp(argv[1], "baton")) {
        if (argc != 4 || (strcmp(argv[2], "take") && strcmp(argv[2], "pass")))
            return usage();
        if (append(line, &len, "baton") || append(line, &len, argv[2]) ||
            append(line, &len, argv[3]))
            return usage();
    } else if (!strcmp(argv[1], "kv") && argc == 5 && !strcmp(argv[2], "set")) {
        if (append(line, &len, "kv set") || append(line, &len, argv[3]) ||
            append(line, &len, argv[4]))
            return usage();
    } else if (!strcmp(argv[1], "kv") && (argc == 4 || argc == 5) && !strcmp(argv[2], "get")) {
        if (argc == 5 && strcmp(argv[4], "--wait"))
            return usage();
        if (append(line, &len, "kv get") || append(line, &len, argv[3]) ||
            append(line, &len, argc == 5 ? "1" : "0"))
            return usage();
        verb_kv_get = 1;
    } else if (!strcmp(argv[1], "nodes") && argc == 2) {
        append(line, &len, "nodes");
    } else if (!strcmp(argv[1], "ended") && argc == 3) {
        if (append(line, &len, "ended") || append(line, &len, argv[2]))
            return usage();
    } else if (!strcmp(argv[1], "resize") && (argc == 4 || argc == 6)) {
        /* "resize CPUS MEM_MIB", "-" for one kept as it is; whole decimal numbers only */
        const char *cpus = "-", *mem = "-";
        for (i = 2; i + 1 < argc; i += 2) {
            const char *v = argv[i + 1];
            if (!*v || strlen(v) > 9 || strspn(v, "0123456789") != strlen(v))
                return usage();
            if (!strcmp(argv[i], "--cpus") && !strcmp(cpus, "-"))
                cpus = v;
            else if (!strcmp(argv[i], "--mem") && !strcmp(mem, "-"))
                mem = v;
            else
                return usage();
        }
        if (append(line, &len, "resize") || append(line, &len, cpus) ||
            append(line, &len, mem))
            return usage();
        print_ok = 1;
    } else if (!strcmp(argv[1], "poison") && argc >= 3) {
        append(line, &len, "poison");
        for (i = 2; i < argc; i++)
            if (append(line, &len, argv[i]))
                return usage();
    } else {
        return usage();
    }
    for (i = 0; line[i]; i++)
        if (line[i] == '\n' || line[i] == '\r') /* one request is one line */
            return usage();
    line[len++] = '\n';

    if (find_port(port, sizeof port)) {
        fputs("vmjob-ctl: no control port " PORT_NAME " (not a gang member?)\n", stderr);
        return 3;
    }
    for (;;) { /* the port is exclusive: wait while another vmjob-ctl has it */
        fd = open(port, O_RDWR | O_NOCTTY);
        if (fd >= 0)
            break;
        if (errno != EBUSY) {
            fprintf(stderr, "vmjob-ctl: %s: %s\n", port, strerror(errno));
            return 3;
        }
        usleep(20000);
    }

    char in[4096], got[MAX_LINE * 2];
    size_t got_len = 0, id_len = strlen(id);
    int answered = 0;
    double backoff = 0.5, resend_at = 0;
    for (;;) {
        if (!answered && now_s() >= resend_at) {
            if (write_all(fd, line, len)) {
                fprintf(stderr, "vmjob-ctl: writing to %s: %s\n", port, strerror(errno));
                return 3;
            }
            resend_at = now_s() + backoff;
            backoff = backoff * 2 > 5 ? 5 : backoff * 2;
        }
        struct pollfd pfd = {fd, POLLIN, 0};
        int r = poll(&pfd, 1, answered ? -1 : 100);
        if (r < 0 && errno != EINTR)
            return 3;
        if (r <= 0 || !(pfd.revents & POLLIN)) {
            if (r > 0 && (pfd.revents & (POLLHUP | POLLERR)))
                usleep(100000); /* no host side right now (a migration): keep trying */
            continue;
        }
        ssize_t n = read(fd, in, sizeof in);
        if (n <= 0) {
            usleep(100000);
            continue;
        }
        for (ssize_t k = 0; k < n; k++) {
            if (in[k] != '\n') {
                if (got_len < sizeof got - 1)
                    got[got_len++] = in[k];
                continue;
            }
            got[got_len] = 0;
            got_len = 0;
            if (strncmp(got, id, id_len) || got[id_len] != ' ')
                continue; /* an answer to another call */
            answered = 1;
            char *kind = got + id_len + 1, *text = strchr(kind, ' ');
            if (text)
                *text++ = 0;
            else
                text = "";
            if (!strcmp(kind, "data")) {
                puts(text);
            } else if (!strcmp(kind, "ok")) {
                if (verb_kv_get || print_ok)
                    puts(text);
                fflush(stdout);
                return 0;
            } else {
                fprintf(stderr, "vmjob-ctl: %s\n", text);
                return 1;
            }
        }
    }
}
