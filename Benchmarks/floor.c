/* The machine's floors, measured with the same no-op `airflow` and the same Redis and Postgres as the executors.
 *
 *   floor BINARY spawn N THREADS                   the spawn limit: posix_spawn + waitpid of BINARY, N times in each
 *                                                  of THREADS threads; prints spawns per second (the issue's
 *                                                  "≈ 1,500 per core", measured here in the same run)
 *   floor BINARY times HOST PORT LIST N            the floor under any executor fed by Celery's client: one consumer
 *                                                  takes each of N messages off kombu's list (BRPOP, as a Celery
 *                                                  worker does), spawns and reaps BINARY, and prints the wall-clock
 *                                                  time (CLOCK_REALTIME, "sec.nsec") it was reaped — no dispatcher
 *                                                  hop, lease, result, ack or parsing. Whatever an executor adds comes
 *                                                  on top, so a target below this cannot be met by any executor here.
 *   floor BINARY rate HOST PORT LIST THREADS       the same as throughput: THREADS consumers (RPOP) drain the
 *                                                  preloaded LIST; prints messages per second and the count
 *   floor BINARY safe HOST PORT LIST THREADS PG    the least an executor that loses nothing and writes durable results
 *                                                  must do: each consumer takes a message with LMOVE into its own
 *                                                  processing list (a worker killed mid-task leaves it there, as
 *                                                  kombu's visibility does), and one writer thread commits every
 *                                                  result waiting (one multi-row INSERT per commit: group commit,
 *                                                  synchronous_commit on) and only then acks them (LREM, pipelined).
 *                                                  PG is a libpq connection string.
 *
 * Built by Benchmarks/run (gcc -O2 floor.c -lhiredis -lpq -pthread). */
#include <hiredis/hiredis.h>
#include <libpq-fe.h>
#include <pthread.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
extern char **environ;

static const char *host, *list, *bin;
static int port;
static long done_total;
static pthread_mutex_t count_lock = PTHREAD_MUTEX_INITIALIZER;

static redisContext *connect_or_die(void) {
    redisContext *c = redisConnect(host, port);
    if (c == NULL || c->err) {
        fprintf(stderr, "floor: cannot connect to Redis at %s:%d: %s — is it running?\n", host, port,
                c ? c->errstr : "out of memory");
        exit(1);
    }
    return c;
}

static const char *pg_conninfo;

static PGconn *pg_connect_or_die(void) {
    PGconn *pg = PQconnectdb(pg_conninfo);
    if (PQstatus(pg) != CONNECTION_OK) {
        fprintf(stderr, "floor: cannot connect to Postgres: %s", PQerrorMessage(pg));
        exit(1);
    }
    return pg;
}

/* Runs the no-op as a task would be run; exits the program if it does not exit 0. */
static void run_task(void) {
    char *argv[] = {(char *)bin, "tasks", "run", "dag", "task", "run_id", NULL};
    pid_t pid;
    int st;
    if (posix_spawn(&pid, bin, NULL, NULL, argv, environ) != 0) { perror("floor: posix_spawn"); exit(1); }
    if (waitpid(pid, &st, 0) != pid || !WIFEXITED(st) || WEXITSTATUS(st) != 0) {
        fprintf(stderr, "floor: %s did not exit 0\n", bin);
        exit(1);
    }
}

static long spawns_per_thread;

static void *spawn_loop(void *arg) {
    (void)arg;
    for (long i = 0; i < spawns_per_thread; i++) run_task();
    return NULL;
}

/* Runs `body` on `threads` threads (each given its index) and returns the seconds until all had ended. */
static double timed_threads(int threads, void *(*body)(void *)) {
    pthread_t th[64];
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (int i = 0; i < threads; i++) pthread_create(&th[i], NULL, body, (void *)(long)i);
    for (int i = 0; i < threads; i++) pthread_join(th[i], NULL);
    clock_gettime(CLOCK_MONOTONIC, &b);
    return (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9;
}

static void *drain(void *arg) {
    (void)arg;
    redisContext *c = connect_or_die();
    long mine = 0;
    for (;;) {
        redisReply *r = redisCommand(c, "RPOP %s", list);
        if (r == NULL) { fprintf(stderr, "floor: Redis connection lost: %s\n", c->errstr); exit(1); }
        int empty = r->type == REDIS_REPLY_NIL;
        freeReplyObject(r);
        if (empty) break;
        run_task();
        mine++;
    }
    pthread_mutex_lock(&count_lock);
    done_total += mine;
    pthread_mutex_unlock(&count_lock);
    redisFree(c);
    return NULL;
}

/* --safe: results waiting for the writer. */
struct done_msg { char *body; size_t len; int consumer; long seq; };
static struct done_msg *pending;
static size_t pending_n, pending_cap;
static int consumers_left;
static pthread_cond_t pending_cond = PTHREAD_COND_INITIALIZER;

/* A consumer's processing list: where its message waits until the writer has committed the result and acked it. */
static void processing_key(char *buf, size_t size, int consumer) {
    snprintf(buf, size, "floor:processing:%d", consumer);
}

static void *safe_consume(void *arg) {
    int me = (int)(long)arg;
    redisContext *c = connect_or_die();
    char processing[64];
    processing_key(processing, sizeof processing, me);
    for (long seq = 0;; seq++) {
        redisReply *r = redisCommand(c, "LMOVE %s %s RIGHT LEFT", list, processing);
        if (r == NULL) { fprintf(stderr, "floor: Redis connection lost: %s\n", c->errstr); exit(1); }
        if (r->type != REDIS_REPLY_STRING) { freeReplyObject(r); break; }
        struct done_msg m = {malloc(r->len), r->len, me, seq};
        memcpy(m.body, r->str, r->len);
        freeReplyObject(r);
        run_task();
        pthread_mutex_lock(&count_lock);
        if (pending_n == pending_cap) {
            pending_cap = pending_cap ? pending_cap * 2 : 64;
            pending = realloc(pending, pending_cap * sizeof *pending);
        }
        pending[pending_n++] = m;
        pthread_cond_signal(&pending_cond);
        pthread_mutex_unlock(&count_lock);
    }
    pthread_mutex_lock(&count_lock);
    consumers_left--;
    pthread_cond_signal(&pending_cond);
    pthread_mutex_unlock(&count_lock);
    redisFree(c);
    return NULL;
}

static void pg_or_die(PGconn *pg, PGresult *res, const char *what) {
    if (PQresultStatus(res) != PGRES_COMMAND_OK && PQresultStatus(res) != PGRES_TUPLES_OK) {
        fprintf(stderr, "floor: %s failed: %s", what, PQerrorMessage(pg));
        exit(1);
    }
    PQclear(res);
}

/* Commits every waiting result in one transaction, then acks them; until the consumers are done and none wait. */
static void *safe_write(void *arg) {
    (void)arg;
    PGconn *pg = pg_connect_or_die();
    redisContext *c = connect_or_die();
    size_t sql_cap = 1 << 16;
    char *sql = malloc(sql_cap);
    for (;;) {
        pthread_mutex_lock(&count_lock);
        while (pending_n == 0 && consumers_left > 0) pthread_cond_wait(&pending_cond, &count_lock);
        if (pending_n == 0) { pthread_mutex_unlock(&count_lock); break; }
        struct done_msg *batch = pending;
        size_t n = pending_n;
        pending = NULL;
        pending_n = pending_cap = 0;
        pthread_mutex_unlock(&count_lock);
        if (sql_cap < 128 + n * 64) { sql_cap = 128 + n * 64; sql = realloc(sql, sql_cap); }
        size_t off = (size_t)snprintf(sql, sql_cap, "INSERT INTO floor_results (task_id, status, date_done) VALUES ");
        for (size_t i = 0; i < n; i++)
            off += (size_t)snprintf(sql + off, sql_cap - off, "%s('t%d-%ld', 'SUCCESS', now())", i ? "," : "",
                                    batch[i].consumer, batch[i].seq);
        pg_or_die(pg, PQexec(pg, sql), "INSERT of results");  /* one statement: its own transaction, one commit */
        for (size_t i = 0; i < n; i++) {
            char processing[64];
            processing_key(processing, sizeof processing, batch[i].consumer);
            redisAppendCommand(c, "LREM %s 1 %b", processing, batch[i].body, batch[i].len);
        }
        for (size_t i = 0; i < n; i++) {
            redisReply *r;
            if (redisGetReply(c, (void **)&r) != REDIS_OK) { fprintf(stderr, "floor: ack failed: %s\n", c->errstr); exit(1); }
            if (r->type != REDIS_REPLY_INTEGER || r->integer != 1) { fprintf(stderr, "floor: ack removed nothing\n"); exit(1); }
            freeReplyObject(r);
            free(batch[i].body);
        }
        free(batch);
        done_total += (long)n;  /* only this thread writes it while consumers run */
    }
    PQfinish(pg);
    redisFree(c);
    return NULL;
}

/* Thread 0 writes; the others consume. */
static void *safe_role(void *arg) {
    long i = (long)arg;
    return i == 0 ? safe_write(NULL) : safe_consume((void *)(i - 1));
}

static int run_safe(int threads) {
    PGconn *pg = pg_connect_or_die();
    /* floor_results is created by Benchmarks/bench.py with its database */
    pg_or_die(pg, PQexec(pg, "TRUNCATE floor_results"), "TRUNCATE of floor_results (does it exist?)");
    PQfinish(pg);
    consumers_left = threads;
    double s = timed_threads(threads + 1, safe_role);
    printf("%.1f %ld\n", done_total / s, done_total);
    return 0;
}

static int usage(void) {
    fprintf(stderr, "usage: floor BINARY spawn N THREADS | times HOST PORT LIST N | rate HOST PORT LIST THREADS"
                    " | safe HOST PORT LIST THREADS PGCONNINFO\n");
    return 2;
}

int main(int argc, char **argv) {
    if (argc < 5) return usage();
    bin = argv[1];
    const char *mode = argv[2];
    if (strcmp(mode, "spawn") == 0) {
        if (argc != 5) return usage();
        spawns_per_thread = atol(argv[3]);
        int threads = atoi(argv[4]);
        if (threads < 1 || threads > 64) { fprintf(stderr, "floor: THREADS must be 1..64\n"); return 2; }
        printf("%.1f\n", spawns_per_thread * threads / timed_threads(threads, spawn_loop));
        return 0;
    }
    int safe = strcmp(mode, "safe") == 0;
    if (argc != (safe ? 8 : 7) || (!safe && strcmp(mode, "times") != 0 && strcmp(mode, "rate") != 0)) return usage();
    host = argv[3];
    port = atoi(argv[4]);
    list = argv[5];
    long n = atol(argv[6]);
    if (strcmp(mode, "times") == 0) {
        redisContext *c = connect_or_die();
        setvbuf(stdout, NULL, _IOLBF, 0);
        for (long i = 0; i < n; i++) {
            redisReply *r = redisCommand(c, "BRPOP %s 30", list);
            if (r == NULL) { fprintf(stderr, "floor: Redis connection lost: %s\n", c->errstr); return 1; }
            if (r->type != REDIS_REPLY_ARRAY) {
                fprintf(stderr, "floor: no message on %s for 30 s after %ld of %ld\n", list, i, n);
                return 1;
            }
            freeReplyObject(r);
            run_task();
            struct timespec t;
            clock_gettime(CLOCK_REALTIME, &t);
            printf("%ld.%09ld\n", (long)t.tv_sec, t.tv_nsec);
        }
        redisFree(c);
        return 0;
    }
    int threads = (int)n;
    if (threads < 1 || threads > 63) { fprintf(stderr, "floor: THREADS must be 1..63\n"); return 2; }
    if (safe) {
        pg_conninfo = argv[7];
        return run_safe(threads);
    }
    double s = timed_threads(threads, drain);
    printf("%.1f %ld\n", done_total / s, done_total);
    return 0;
}
