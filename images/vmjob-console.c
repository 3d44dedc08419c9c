/* vmjob-console: the guest side of an interactive job (`vmjob run -i`, `vmjob shell`).
 *
 *     vmjob-console pipe|tty PORT CMD [ARG...]
 *
 * Runs CMD with its stdin fed from the virtio-serial port PORT (org.vmjobs.input.0), which
 * carries frames from the host (docs/guest-protocol.md, vmjobs/console.py):
 *
 *     d <n>\n<n bytes>      input bytes (1 <= n <= 65536)
 *     w <rows> <cols>\n     the terminal's window size (tty only; 1..9999 each)
 *     e\n                   end of input
 *
 * pipe: CMD's stdin is a pipe; its stdout and stderr are this program's (the output port).
 *       "e" closes the pipe: CMD reads end of file.
 * tty:  CMD runs in a new session on a pseudo-terminal (its controlling terminal, stdin,
 *       stdout, stderr); input bytes go through the terminal's line discipline, so a Ctrl+C
 *       byte sends SIGINT to the foreground process group; "w" sets the window size
 *       (TIOCSWINSZ: the foreground group gets SIGWINCH); what CMD writes to the terminal is
 *       copied to this program's stdout (the output port). "e" sends the VEOF character.
 *       Before starting CMD it waits up to 3 s for a first "w" frame, so CMD starts with the
 *       client's size.
 *
 * Exits with CMD's status (128 + signal number if a signal ended it); 125 if it could not
 * start CMD. A malformed frame ends input (as "e"), with a message on stderr. While nobody is
 * connected on the host side the port reads end of file at once: it is looked at again every
 * 100 ms. Built static by vmjobs/cbuild.py and sent in the job's archive.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define MAX_DATA 65536
#define HEADER_MAX 32

static int sigpipe_fds[2] = {-1, -1};

static void on_child(int signum)
{
    int saved = errno;
    (void)signum;
    if (write(sigpipe_fds[1], "c", 1) < 0) { /* the pipe is full: a wake-up is pending */ }
    errno = saved;
}

/* Frame parser state: input arrives in arbitrary pieces. */
struct parser {
    char header[HEADER_MAX + 1];
    size_t header_len;
    long data_left; /* > 0: inside a "d" frame's payload */
};

/* Pending bytes for CMD's input (pipe or pty master). */
static char pending[MAX_DATA * 2];
static size_t pending_len;
static int input_done; /* "e" seen (or a malformed frame) */
static int eof_sent;

static long number(const char *text, long max)
{
    long v = 0;
    if (!*text)
        return -1;
    for (; *text; text++) {
        if (*text < '0' || *text > '9' || v > max)
            return -1;
        v = v * 10 + (*text - '0');
    }
    return v > max ? -1 : v;
}

static void set_size(int tty_fd, const char *args)
{
    char rows[8], cols[8];
    struct winsize ws;
    if (tty_fd < 0 || sscanf(args, "%7[0-9] %7[0-9]", rows, cols) != 2)
        return;
    long r = number(rows, 9999), c = number(cols, 9999);
    if (r < 1 || c < 1)
        return;
    memset(&ws, 0, sizeof ws);
    ws.ws_row = (unsigned short)r;
    ws.ws_col = (unsigned short)c;
    ioctl(tty_fd, TIOCSWINSZ, &ws);
}

/* Feed `len` bytes from the port; returns the number consumed (it stops when `pending` is
 * full, leaving the rest for later). Sets *sized when a "w" frame was applied. */
static size_t feed(struct parser *p, const char *buf, size_t len, int tty_fd, int *sized)
{
    size_t used = 0;
    while (used < len && !input_done) {
        if (p->data_left > 0) {
            size_t room = sizeof pending - pending_len;
            size_t n = len - used;
            if (n > (size_t)p->data_left)
                n = (size_t)p->data_left;
            if (n > room)
                n = room;
            if (n == 0)
                break; /* pending is full: CMD is not reading */
            memcpy(pending + pending_len, buf + used, n);
            pending_len += n;
            p->data_left -= (long)n;
            used += n;
            continue;
        }
        char ch = buf[used++];
        if (ch != '\n') {
            if (p->header_len >= HEADER_MAX) {
                fprintf(stderr, "vmjob-console: malformed frame on the input port\n");
                input_done = 1;
                break;
            }
            p->header[p->header_len++] = ch;
            continue;
        }
        p->header[p->header_len] = '\0';
        p->header_len = 0;
        if (p->header[0] == 'd' && p->header[1] == ' ') {
            long n = number(p->header + 2, MAX_DATA);
            if (n < 1) {
                fprintf(stderr, "vmjob-console: malformed frame on the input port\n");
                input_done = 1;
                break;
            }
            p->data_left = n;
        } else if (p->header[0] == 'w' && p->header[1] == ' ') {
            set_size(tty_fd, p->header + 2);
            *sized = 1;
        } else if (strcmp(p->header, "e") == 0) {
            input_done = 1;
        } else {
            fprintf(stderr, "vmjob-console: malformed frame on the input port\n");
            input_done = 1;
        }
    }
    return used;
}

static int write_all(int fd, const char *buf, size_t len)
{
    while (len) {
        ssize_t n = write(fd, buf, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

static long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int main(int argc, char **argv)
{
    if (argc < 4 || (strcmp(argv[1], "pipe") != 0 && strcmp(argv[1], "tty") != 0)) {
        fprintf(stderr, "usage: vmjob-console pipe|tty PORT CMD [ARG...]\n");
        return 125;
    }
    int tty = strcmp(argv[1], "tty") == 0;
    int port = open(argv[2], O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (port < 0) {
        fprintf(stderr, "vmjob-console: %s: %s\n", argv[2], strerror(errno));
        return 125;
    }
    if (pipe2(sigpipe_fds, O_CLOEXEC | O_NONBLOCK) < 0)
        return 125;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_child;
    sa.sa_flags = SA_NOCLDSTOP | SA_RESTART;
    sigaction(SIGCHLD, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    struct parser parser;
    memset(&parser, 0, sizeof parser);
    char buf[8192];
    int master = -1, to_child = -1, sized = 0, port_quiet_until = 0;
    long long quiet_until = 0;
    (void)port_quiet_until;

    if (tty) {
        master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
        if (master < 0 || grantpt(master) < 0 || unlockpt(master) < 0) {
            fprintf(stderr, "vmjob-console: no pseudo-terminal: %s\n", strerror(errno));
            return 125;
        }
        /* The first frame is normally the window size: wait for it a little. */
        long long until = now_ms() + 3000;
        while (!sized && !input_done && now_ms() < until) {
            struct pollfd pf = {port, POLLIN, 0};
            poll(&pf, 1, 100);
            ssize_t n = read(port, buf, sizeof buf);
            if (n > 0) {
                size_t used = feed(&parser, buf, (size_t)n, master, &sized);
                if (used < (size_t)n) { /* cannot happen before CMD runs: pending is empty */
                    input_done = 1;
                }
            } else {
                usleep(100000);
            }
        }
    }
    int child_in[2] = {-1, -1};
    if (!tty && pipe2(child_in, O_CLOEXEC) < 0)
        return 125;
    pid_t pid = fork();
    if (pid < 0)
        return 125;
    if (pid == 0) {
        signal(SIGPIPE, SIG_DFL);
        signal(SIGCHLD, SIG_DFL);
        if (tty) {
            setsid();
            int slave = open(ptsname(master), O_RDWR);
            if (slave < 0 || ioctl(slave, TIOCSCTTY, 0) < 0) {
                fprintf(stderr, "vmjob-console: no controlling terminal: %s\n",
                        strerror(errno));
                _exit(125);
            }
            dup2(slave, 0);
            dup2(slave, 1);
            dup2(slave, 2);
            if (slave > 2)
                close(slave);
        } else {
            dup2(child_in[0], 0);
        }
        execvp(argv[3], argv + 3);
        fprintf(stderr, "vmjob-console: %s: %s\n", argv[3], strerror(errno));
        _exit(errno == ENOENT ? 127 : 126);
    }
    if (!tty) {
        close(child_in[0]);
        to_child = child_in[1];
        fcntl(to_child, F_SETFL, O_NONBLOCK);
    } else {
        to_child = master;
        fcntl(master, F_SETFL, O_NONBLOCK);
    }

    int status = 0, exited = 0, master_open = tty;
    while (!exited || master_open) {
        struct pollfd fds[4];
        int nfds = 0, i_sig, i_port = -1, i_out = -1, i_master = -1;
        i_sig = nfds;
        fds[nfds++] = (struct pollfd){sigpipe_fds[0], POLLIN, 0};
        int want_port = !exited && !input_done && pending_len < sizeof pending / 2 &&
                        now_ms() >= quiet_until;
        if (want_port) {
            i_port = nfds;
            fds[nfds++] = (struct pollfd){port, POLLIN, 0};
        }
        if (!exited && to_child >= 0 && pending_len) {
            i_out = nfds;
            fds[nfds++] = (struct pollfd){to_child, POLLOUT, 0};
        }
        if (master_open) {
            i_master = nfds;
            fds[nfds++] = (struct pollfd){master, POLLIN, 0};
        }
        int timeout = exited ? 200 : (want_port || input_done ? -1 : 100);
        int ready = poll(fds, (nfds_t)nfds, timeout);
        if (ready < 0 && errno != EINTR)
            break;
        if (ready == 0 && exited)
            break; /* CMD is gone and its terminal has been quiet: done */
        if (fds[i_sig].revents & POLLIN) {
            char drain[64];
            while (read(sigpipe_fds[0], drain, sizeof drain) > 0) {
            }
            if (!exited && waitpid(pid, &status, WNOHANG) == pid)
                exited = 1;
        }
        if (i_port >= 0 && fds[i_port].revents) {
            ssize_t n = read(port, buf, sizeof buf - sizeof buf / 2);
            if (n > 0) {
                size_t used = feed(&parser, buf, (size_t)n, master, &sized);
                if (used < (size_t)n) {
                    /* cannot happen: the port is read only while pending is half empty and
                     * a read is at most half of it */
                    input_done = 1;
                }
            } else if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
                quiet_until = now_ms() + 100; /* nobody on the host side (yet) */
            }
        }
        if (i_out >= 0 && (fds[i_out].revents & (POLLOUT | POLLERR | POLLHUP))) {
            ssize_t n = write(to_child, pending, pending_len);
            if (n > 0) {
                memmove(pending, pending + n, pending_len - (size_t)n);
                pending_len -= (size_t)n;
            } else if (n < 0 && errno != EAGAIN && errno != EINTR) {
                pending_len = 0; /* CMD closed its input: what it did not read is dropped */
                input_done = 1;
            }
        }
        if (input_done && !pending_len && !eof_sent && !exited) {
            eof_sent = 1;
            if (tty) {
                struct termios t;
                char veof = 4;
                if (tcgetattr(master, &t) == 0)
                    veof = (char)t.c_cc[VEOF];
                write_all(master, &veof, 1);
            } else {
                close(to_child);
                to_child = -1;
            }
        }
        if (i_master >= 0 && fds[i_master].revents) {
            ssize_t n = read(master, buf, sizeof buf);
            if (n > 0) {
                if (write_all(1, buf, (size_t)n) < 0)
                    master_open = 0;
            } else if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
                master_open = 0; /* EIO: nobody holds the terminal any more */
            }
        }
        if (!exited && waitpid(pid, &status, WNOHANG) == pid)
            exited = 1;
    }
    if (!exited)
        waitpid(pid, &status, 0);
    if (WIFEXITED(status))
        return WEXITSTATUS(status);
    if (WIFSIGNALED(status))
        return 128 + WTERMSIG(status);
    return 125;
}
