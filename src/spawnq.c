/*
 * spawnq.c - the I/O thread's side of the spawner protocol (spawner.h):
 * requests (fork a worker, signal one) queued until the spawner's socket
 * takes them, and the spawner's reports (forked, could not fork, ended).
 * Runs with io->lock held (io.h).
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "io.h"

/* Registers for EPOLLOUT on the spawner's socket while requests wait. */
static void watch(struct pz_io *io)
{
    int want = io->nspq > 0;
    if (want == io->spawner_out || io->spawner_gone)
        return;
    io->spawner_out = want;
    struct epoll_event ev = {EPOLLIN | (want ? EPOLLOUT : 0), {.u64 = PZ_TOKEN_SPAWNER}};
    if (epoll_ctl(io->ep, EPOLL_CTL_MOD, io->p->spawner_fd, &ev) != 0) {
        char msg[160];
        snprintf(msg, sizeof msg, "epoll_ctl on the spawner's socket failed: %s", strerror(errno));
        pz_io_fail(io, msg);
    }
}

void pz_spawnq_shut(struct pz_io *io)
{
    if (io->spawner_shut)
        return;
    io->spawner_shut = 1;
    /* Cannot fail on a connected socket; the spawner's end of file comes
     * either way when it exits. */
    shutdown(io->p->spawner_fd, SHUT_WR);
}

void pz_spawnq_flush(struct pz_io *io)
{
    size_t i = 0;
    while (i < io->nspq && !io->spawner_gone && !io->spawner_shut) {
        pz_spawn_req *r = &io->spq[i];
        if (pz_spawn_send(io->p->spawner_fd, &r->m, r->fd) != 0) {
            /* Full, or short of kernel memory for a moment: try again when
             * the socket is writable. */
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS || errno == ENOMEM)
                break;
            /* Anything else: the spawner cannot be used.  Shutting our side
             * makes it kill its workers and leave; its end of file then
             * takes the usual path (spawner_lost). */
            pz_spawnq_shut(io);
            break;
        }
        if (r->fd >= 0)
            close(r->fd);
        i++;
    }
    memmove(io->spq, io->spq + i, (io->nspq - i) * sizeof *io->spq);
    io->nspq -= i;
    watch(io);
}

static void request(struct pz_io *io, int kind, const pz_slot *w, pid_t pid, int arg, int fd)
{
    if (io->nspq == io->capspq) {
        size_t cap = io->capspq ? io->capspq * 2 : 16;
        pz_spawn_req *q = realloc(io->spq, cap * sizeof *q);
        if (!q) {
            if (fd >= 0)
                close(fd);
            pz_io_fail(io, "out of memory in the I/O thread (a request to the spawner)");
            return;
        }
        io->spq = q;
        io->capspq = cap;
    }
    io->spq[io->nspq++] = (pz_spawn_req){{kind, w->index, w->gen, pid, arg}, fd};
    pz_spawnq_flush(io);
}

void pz_spawnq_spawn(struct pz_io *io, pz_slot *w, int fd)
{
    /* `slot` says which record (its shared memory), `arg` which slot. */
    request(io, PZ_S_SPAWN, w, 0, w->slot, fd);
}

void pz_spawnq_kill(struct pz_io *io, pz_slot *w, int sig)
{
    if (!w->alive || w->exited)
        return;
    /* Only a pid the spawner reported: one learnt from the worker itself
     * waits for the report like an unknown one. */
    if (w->pid_reported)
        request(io, PZ_S_KILL, w, w->pid, sig, -1);
    else if (w->pending_sig != SIGKILL)
        w->pending_sig = sig;
}

/* The live record whose reported pid is pid.  A pid learnt from a worker's
 * INIT_OK is not matched: the spawner's reports come in order, so the end
 * of an earlier worker that had the same pid (reused) may still be unread,
 * and would be taken for this one's. */
static pz_slot *slot_by_pid(struct pz_io *io, pid_t pid)
{
    for (int i = 0; i < io->nrecords; i++)
        if (io->slots[i].alive && io->slots[i].pid_reported && io->slots[i].pid == pid)
            return &io->slots[i];
    return NULL;
}

/* The slot a report about (slot, gen) concerns, if it is still current. */
static pz_slot *slot_of(struct pz_io *io, const pz_spawn_msg *m)
{
    if (m->slot < 0 || m->slot >= io->nrecords || io->slots[m->slot].gen != m->gen)
        return NULL;
    return &io->slots[m->slot];
}

/* The spawner is gone: its workers die with it (their parent-death
 * signal), and no worker can be started any more. */
static void spawner_lost(struct pz_io *io)
{
    io->spawner_gone = 1;
    epoll_ctl(io->ep, EPOLL_CTL_DEL, io->p->spawner_fd, NULL);
    for (size_t i = 0; i < io->nspq; i++)
        if (io->spq[i].fd >= 0)
            close(io->spq[i].fd);
    io->nspq = 0;
    if (!io->stopping && !io->fatal)
        pz_io_remember_error(io, "the spawner process died");
    for (int i = 0; i < io->nrecords; i++) {
        pz_slot *w = &io->slots[i];
        if (w->alive)
            pz_slot_ended(io, w, 0, 0);
        if (w->state == SLOT_IDLE) {
            w->state = SLOT_GONE;
            /* A slot that never initialized says why in p.init_errors,
             * as one given up after its attempts does (slot.c). */
            if (!io->settled[w->slot] && !io->stopping) {
                char why[256];
                snprintf(why, sizeof why, "the spawner process died before this worker initialized%s%s%s",
                         io->spawner_why[0] ? " (it could not go on: " : "", io->spawner_why,
                         io->spawner_why[0] ? ")" : "");
                pz_part parts[] = {{why, strlen(why), 1}, {NULL, 0, 0}};
                pz_io_record(io, PZ_F_INIT_ERROR, 0, (uint64_t)w->slot, parts, 2);
                pz_io_settle(io, w);
            }
        }
    }
    pz_io_check_fatal(io);
}

void pz_spawnq_read(struct pz_io *io)
{
    for (;;) {
        pz_spawn_msg m;
        int fd;
        int r = pz_spawn_recv(io->p->spawner_fd, &m, &fd);
        if (fd >= 0)
            close(fd);
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
            return;
        if (r <= 0) {
            spawner_lost(io);
            return;
        }
        pz_slot *w;
        switch (m.kind) {
        case PZ_S_SPAWNED:
            if ((w = slot_of(io, &m)) != NULL) {
                w->pid = m.pid;
                w->pid_reported = 1;
                if (w->pending_sig) {
                    pz_spawnq_kill(io, w, w->pending_sig);
                    w->pending_sig = 0;
                }
            }
            break;
        case PZ_S_FAILED:
            if ((w = slot_of(io, &m)) != NULL) {
                snprintf(w->why, sizeof w->why, "could not be forked (%s)", strerror(m.arg));
                pz_slot_ended(io, w, 0, 0);
            }
            break;
        case PZ_S_EXEC_FAILED:
            if ((w = slot_of(io, &m)) != NULL) {
                snprintf(w->why, sizeof w->why, "could not run its launcher %.80s (%s)",
                         io->p->launch[w->slot][0], strerror(m.arg));
                pz_slot_ended(io, w, 0, 0);
            }
            break;
        case PZ_S_GAVE_UP: /* its end of file follows */
            if (pz_spawner_step(m.slot))
                snprintf(io->spawner_why, sizeof io->spawner_why, "%s: %s", pz_spawner_step(m.slot),
                         strerror(m.arg));
            break;
        case PZ_S_EXITED:
            if ((w = slot_by_pid(io, m.pid)) != NULL) {
                w->exited = 1;
                pz_slot_ended(io, w, 1, m.arg);
            }
            break;
        default:
            break;
        }
    }
}
