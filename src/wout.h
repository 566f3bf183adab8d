/*
 * wout.h - a worker's output: the frames it has built and not yet
 * written, written in batches.
 *
 * Batching makes tiny calls cheap (one write carries many results), but a
 * result kept for the batch must not wait behind a long call that comes
 * next: the worker cannot know a call is long before it runs it, and a
 * long call may well be C code that no hook interrupts.  So a second
 * thread, the flusher, writes results that have waited longer than
 * PZ_WOUT_LATE_NS, whatever the worker's main thread is doing.
 *
 * Rules: the main thread appends to the buffer only between
 * pz_wout_lock() and pz_wout_unlock(), and keeps it holding only whole
 * frames whenever it unlocks; the flusher writes only under the same lock
 * (wout.c: two plain stores and a load for the main thread, a membarrier
 * for the flusher, where the kernel has it).
 * Nothing else touches the buffer.  The flusher takes no signal, and sleeps
 * on an alarm (a timerfd), set under the lock, that is pending whenever the
 * buffer holds frames, due when the oldest is late (it may also go off
 * after a write, with nothing late: wout.c), and on an eventfd that
 * SIGTERM's handler writes: then it writes the batch and ends the process
 * (wout.c).
 */
#ifndef PZ_WOUT_H
#define PZ_WOUT_H

#include <stdint.h>

#include "buf.h"

/* A batch goes out, written by the main thread, after the call during
 * which its oldest result became PZ_WOUT_BATCH_NS old (worker.c says why
 * this long).  The flusher writes it only once it is PZ_WOUT_LATE_NS old:
 * half a batch later, so that behind calls shorter than that the main
 * thread's write always comes first, and the flusher sleeps.  (With both
 * at one time, a worker busy with 100 us calls woke its flusher for about
 * every other batch: the alarm went off during the call after which the
 * main thread would have written it, and the flusher's write took a CPU
 * from a worker.) */
#define PZ_WOUT_BATCH_NS 3000000
#define PZ_WOUT_LATE_NS (PZ_WOUT_BATCH_NS + PZ_WOUT_BATCH_NS / 2)

/* Sets the output up on descriptor fd (nothing is written yet). */
void pz_wout_init(int fd);

/* Starts the flusher thread.  Before this, the main thread may use the
 * buffer without the lock. */
void pz_wout_start_flusher(void);

/* Main thread: takes and releases the lock; pz_wout_buf is valid while it
 * is held.  pz_wout_locked() says whether the main thread holds it.
 * pz_wout_lock returns 1 when it had to wait (the flusher was writing). */
int pz_wout_lock(void);
void pz_wout_unlock(void);
int pz_wout_locked(void);
pz_buf *pz_wout_buf(void);

/* Main thread, locked: counts one whole frame just appended, made at
 * `now` (pz_now_ns: the worker's last clock reading), whose big strings
 * took `shared` bytes of the worker's ring (arena.h) besides. */
void pz_wout_frame_done(int64_t now, size_t shared);

/* Main thread, locked: counts `shared` more bytes of the ring for the
 * frames in the buffer (a frame that grew: a run's answer, worker.c). */
void pz_wout_add_shared(size_t shared);

/* Main thread, locked: how many times the buffer has been written so far
 * (a frame appended before the last write is gone from it). */
uint64_t pz_wout_writes(void);

/* Main thread, locked: drops whatever follows byte `len` (a frame being
 * built that cannot be finished), and sets the frame count to `frames`. */
void pz_wout_truncate(size_t len, int frames);

/* Frames in the buffer, when the oldest of them was made, and the bytes
 * they stand for: their own and their strings' in the ring (locked). */
int pz_wout_frames(void);
int64_t pz_wout_oldest(void);
size_t pz_wout_bytes(void);

/* Main thread: writes everything now (takes the lock if it does not hold
 * it).  Returns 1 when it wrote something (the time that took, a write
 * may block, is nobody's call's), else 0.  Ends the process when the
 * parent is gone. */
int pz_wout_flush(void);

/* Main thread: pz_wout_flush before a read that may wait: the flusher's
 * alarm is cleared too, so that a worker left idle does not wake it
 * (wout.c). */
int pz_wout_flush_idle(void);

#endif
