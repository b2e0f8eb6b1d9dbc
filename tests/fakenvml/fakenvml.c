/* A fake libnvidia-ml.so.1 for the fault tests: the real nvidia-ml-py loads it through ctypes.
 *
 * Signatures and struct layouts are those of NVIDIA's nvml.h (as nvidia-ml-py declares them),
 * for the functions gpuwatch calls. What the GPUs answer, and which faults they show, comes from
 * the control file named by $FAKENVML_CONTROL, read again whenever it changes (write it
 * atomically: a new file renamed over the old one). One directive a line; '#' starts a comment:
 *
 *   gpu <index> <uuid> <memory_total_mib> <memory_used_mib> <utilization_%> <name...>
 *   proc <gpu> <pid> <used_bytes> [graphics] [on <gi> <ci>]
 *                                              a process on the GPU (compute unless "graphics"),
 *                                              on a MIG GPU on that GPU and compute instance
 *   lost <gpu>                                 every call on that GPU returns GPU_IS_LOST (15)
 *   error <gpu|*> <function> <code>            that function returns that nvmlReturn_t
 *   hang <gpu|*> <function> [ms]               the call blocks while this line is there (or ms)
 *   xid <gpu> <code> <id>                      one Xid event, delivered once per id
 *   init_error <code>                          nvmlInit fails with that code
 *   init_delay_ms <ms>                         nvmlInit takes that long
 *   count <n>                                  nvmlDeviceGetCount answers n (default: gpu lines)
 *   log <function|*>                           append "<function> <gpu>" to $FAKENVML_LOG per call
 *   field <gpu|*> <field_id> <value>           what nvmlDeviceGetFieldValues answers for the field
 *   field_error <gpu|*> <field_id> <code>      the field's own nvmlReturn in that call
 *   pcie <gpu> <generation> <width>            the link as it runs (default 5 16, the maximum)
 *   mig <gpu> <gi> <ci> <mig_uuid> <gpu_slices> <memory_total_mib> <memory_used_mib> [profile]
 *                                              a MIG device (compute instance <ci> of GPU instance
 *                                              <gi>) of the GPU, which is then in MIG mode; its
 *                                              name is "<gpu name> MIG <profile>", the GPU's name
 *                                              without a profile (or "-"): its attributes tell;
 *                                              the first line of a GPU instance gives its slices
 *                                              and memory, a later one its compute instance's slices
 *   mig_mode <gpu> <current> <pending>         the MIG mode (default: 1 1 with mig lines, else 0 0)
 *
 * MIG, as a driver answers it: nvmlDeviceGetMigDeviceHandleByIndex hands out the GPU's MIG
 * devices in the order of their lines (NOT_FOUND past them, up to nvmlDeviceGetMaxMigDeviceCount,
 * 7); a MIG device's handle answers its UUID, name, memory (its GPU instance's), GPU and compute
 * instance ids, attributes, parent and processes, every other query NOT_SUPPORTED, and NOT_FOUND
 * once its line is gone (reconfigured). A GPU in MIG mode answers its processes with their
 * instance ids and its utilisation (GPU, encoder, decoder) NOT_SUPPORTED; the rest stays there. A
 * call on a MIG device's handle is logged, and meets its faults, as one on its GPU (<gpu>).
 *
 * nvmlDeviceGetFieldValues answers each field as the function that reads it alone would: a
 * "hang" or "error" of nvmlDeviceGetPowerUsage hangs the call, or fails the power fields.
 * Fields without a value are NOT_SUPPORTED, except the defaults of field_default(); NVLink
 * fields only with "field <gpu> 91 <links>" (NVML_FI_DEV_NVLINK_LINK_COUNT).
 *
 * <function> is the C symbol (nvmlDeviceGetHandleByIndex_v2, nvmlDeviceGetMemoryInfo_v2, ...).
 * A GPU that comes back (no longer lost, or present again) loses its event registrations, as a
 * reset GPU does: Xid events reach it only once it is registered again.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

typedef int nvmlReturn_t;
enum {
    NVML_SUCCESS = 0, NVML_ERROR_UNINITIALIZED = 1, NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3, NVML_ERROR_NOT_FOUND = 6, NVML_ERROR_INSUFFICIENT_SIZE = 7, NVML_ERROR_TIMEOUT = 10,
    NVML_ERROR_GPU_IS_LOST = 15, NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25,
    NVML_ERROR_UNKNOWN = 999,
};

#define MAX_GPUS 16
#define MAX_ITEMS 256
#define NAME_LEN 96
#define XID_EVENT 0x8ULL /* nvmlEventTypeXidCriticalError */
#define MEMORY_V2 0x02000028u /* nvmlMemory_v2: sizeof(nvmlMemory_v2_t) | 2 << 24 */
#define MIB (1024ULL * 1024ULL)
#define MAX_MIG 7   /* MIG devices per GPU: nvmlDeviceGetMaxMigDeviceCount */
#define MAX_GI 16   /* GPU instance ids (an H100's go up to 14) */
#define MAX_CI 8    /* compute instance ids */
#define NO_INSTANCE 0xFFFFFFFFu /* the instance ids of a process of a GPU without MIG */
#define SM_PER_SLICE 16u

typedef struct nvmlDevice_st { int index, gi, ci; } *nvmlDevice_t; /* gi, ci: -1 on a GPU */
typedef struct nvmlPciInfo_st {
    char busIdLegacy[16];
    unsigned int domain, bus, device, pciDeviceId, pciSubSystemId;
    char busId[32];
} nvmlPciInfo_t;
typedef struct { unsigned int gpu, memory; } nvmlUtilization_t;
typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
typedef struct { unsigned int version; unsigned long long total, reserved, free, used; } nvmlMemory_v2_t;
typedef struct { unsigned int pid; unsigned long long usedGpuMemory; } nvmlProcessInfo_v1_t;
typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId, computeInstanceId;
} nvmlProcessInfo_v2_t; /* and _v3, as nvidia-ml-py lays it out */
typedef struct {
    nvmlDevice_t device;
    unsigned long long eventType, eventData;
    unsigned int gpuInstanceId, computeInstanceId;
} nvmlEventData_t;
typedef struct { /* nvmlDeviceAttributes_t (v2) of nvml.h */
    unsigned int multiprocessorCount, sharedCopyEngineCount, sharedDecoderCount, sharedEncoderCount,
        sharedJpegCount, sharedOfaCount, gpuInstanceSliceCount, computeInstanceSliceCount;
    unsigned long long memorySizeMB;
} nvmlDeviceAttributes_t;
typedef struct nvmlEventSet_st { int registered[MAX_GPUS]; unsigned generation[MAX_GPUS]; } *nvmlEventSet_t;

struct gpu { int present, lost; char uuid[NAME_LEN], name[NAME_LEN]; unsigned long long total, used; unsigned util; };
struct proc { int gpu, graphics; unsigned pid, gi, ci; unsigned long long used; };
struct mig { int gpu; unsigned gi, ci, slices; unsigned long long total, used; char uuid[NAME_LEN], profile[32]; };
struct fault { int gpu; char function[64]; long value; }; /* gpu -1: any; value: code or ms */
struct xid { int gpu; unsigned long long code; char id[32]; };
struct field { int gpu; unsigned id; long long value; }; /* gpu -1: any; value or code */

static struct state {
    struct gpu gpus[MAX_GPUS];
    int count, nprocs, nerrors, nhangs, nxids, nlogs, nfields, nfield_errors, init_error, nmigs;
    long init_delay_ms;
    struct field fields[MAX_ITEMS], field_errors[MAX_ITEMS];
    unsigned pcie[MAX_GPUS][2]; /* generation, width as the link runs; 0: the maximum */
    struct proc procs[MAX_ITEMS];
    struct mig migs[MAX_GPUS * MAX_MIG];
    int mig_mode[MAX_GPUS][3]; /* set, current, pending */
    struct fault errors[MAX_ITEMS], hangs[MAX_ITEMS];
    struct xid xids[MAX_ITEMS];
    char logs[MAX_ITEMS][64];
} st = { .count = -1 };

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static struct nvmlDevice_st devices[MAX_GPUS];
static struct nvmlDevice_st mig_devices[MAX_GPUS][MAX_GI][MAX_CI]; /* one handle per instance */
static unsigned generation[MAX_GPUS]; /* bumped when a GPU comes back */
static char delivered[MAX_ITEMS][40]; /* "gpu:id" of Xid events already delivered */
static int ndelivered, initialized, loaded;
static struct stat seen;
static struct timespec started;

static long ms_since(const struct timespec *t0) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (now.tv_sec - t0->tv_sec) * 1000 + (now.tv_nsec - t0->tv_nsec) / 1000000;
}

static void sleep_ms(long ms) {
    struct timespec t = { ms / 1000, (ms % 1000) * 1000000 };
    nanosleep(&t, NULL);
}

static int parse_gpu(const char *word) { return strcmp(word, "*") == 0 ? -1 : atoi(word); }

static void parse_line(struct state *s, char *line) {
    char word[64] = "", a[NAME_LEN] = "", b[64] = "", c[64] = "";
    int at = 0, index;
    line[strcspn(line, "#\r\n")] = '\0';
    if (sscanf(line, "%63s %95s %63s %63s %n", word, a, b, c, &at) < 1)
        return;
    if (strcmp(word, "gpu") == 0 && (index = atoi(a)) >= 0 && index < MAX_GPUS) {
        struct gpu *g = &s->gpus[index];
        unsigned long long total = 81920, used = 0;
        unsigned util = 0;
        int name_at = 0;
        g->present = 1;
        sscanf(line, "%*s %*s %95s %llu %llu %u %n", g->uuid, &total, &used, &util, &name_at);
        g->total = total * MIB, g->used = used * MIB, g->util = util;
        if (g->uuid[0] == '\0')
            snprintf(g->uuid, sizeof g->uuid, "GPU-%08d-fake-0000-0000-000000000000", index);
        snprintf(g->name, sizeof g->name, "%s", name_at ? line + name_at : "NVIDIA H100 80GB HBM3");
    } else if (strcmp(word, "proc") == 0 && s->nprocs < MAX_ITEMS) {
        struct proc *p = &s->procs[s->nprocs++];
        p->gpu = atoi(a), p->pid = (unsigned)strtoul(b, NULL, 10), p->used = strtoull(c, NULL, 10);
        p->graphics = strstr(line + at, "graphics") != NULL;
        p->gi = p->ci = NO_INSTANCE;
        const char *on = strstr(line + at, "on ");
        if (on != NULL)
            sscanf(on, "on %u %u", &p->gi, &p->ci);
    } else if (strcmp(word, "mig") == 0 && (index = atoi(a)) >= 0 && index < MAX_GPUS &&
               s->nmigs < MAX_GPUS * MAX_MIG) {
        struct mig *m = &s->migs[s->nmigs];
        unsigned long long total = 0, used = 0;
        char profile[32] = "";
        m->gpu = index;
        if (sscanf(line, "%*s %*s %u %u %95s %u %llu %llu %31s", &m->gi, &m->ci, m->uuid, &m->slices,
                   &total, &used, profile) >= 6 && m->gi < MAX_GI && m->ci < MAX_CI) {
            m->total = total * MIB, m->used = used * MIB;
            snprintf(m->profile, sizeof m->profile, "%s", strcmp(profile, "-") == 0 ? "" : profile);
            s->nmigs++;
        }
    } else if (strcmp(word, "mig_mode") == 0 && (index = atoi(a)) >= 0 && index < MAX_GPUS) {
        s->mig_mode[index][0] = 1, s->mig_mode[index][1] = atoi(b), s->mig_mode[index][2] = atoi(c);
    } else if (strcmp(word, "lost") == 0 && (index = atoi(a)) >= 0 && index < MAX_GPUS) {
        s->gpus[index].lost = 1;
    } else if ((strcmp(word, "error") == 0 && s->nerrors < MAX_ITEMS) ||
               (strcmp(word, "hang") == 0 && s->nhangs < MAX_ITEMS)) {
        struct fault *f = word[0] == 'e' ? &s->errors[s->nerrors++] : &s->hangs[s->nhangs++];
        f->gpu = parse_gpu(a), f->value = atol(c);
        snprintf(f->function, sizeof f->function, "%s", b);
    } else if (strcmp(word, "xid") == 0 && s->nxids < MAX_ITEMS) {
        struct xid *x = &s->xids[s->nxids++];
        x->gpu = atoi(a), x->code = strtoull(b, NULL, 10);
        snprintf(x->id, sizeof x->id, "%s", c);
    } else if (strcmp(word, "init_error") == 0) {
        s->init_error = atoi(a);
    } else if (strcmp(word, "init_delay_ms") == 0) {
        s->init_delay_ms = atol(a);
    } else if (strcmp(word, "count") == 0) {
        s->count = atoi(a);
    } else if ((strcmp(word, "field") == 0 && s->nfields < MAX_ITEMS) ||
               (strcmp(word, "field_error") == 0 && s->nfield_errors < MAX_ITEMS)) {
        struct field *f = word[5] == '\0' ? &s->fields[s->nfields++] : &s->field_errors[s->nfield_errors++];
        f->gpu = parse_gpu(a), f->id = (unsigned)strtoul(b, NULL, 10), f->value = atoll(c);
    } else if (strcmp(word, "pcie") == 0 && (index = atoi(a)) >= 0 && index < MAX_GPUS) {
        s->pcie[index][0] = (unsigned)atoi(b), s->pcie[index][1] = (unsigned)atoi(c);
    } else if (strcmp(word, "log") == 0 && s->nlogs < MAX_ITEMS) {
        snprintf(s->logs[s->nlogs++], sizeof s->logs[0], "%s", a);
    }
}

/* Read the control file again if it changed; called with mu held. */
static void reload(void) {
    const char *path = getenv("FAKENVML_CONTROL");
    static struct state next;
    struct stat now;
    char line[512];
    FILE *f;
    if (!loaded) {
        clock_gettime(CLOCK_MONOTONIC, &started);
        for (int i = 0; i < MAX_GPUS; i++) {
            devices[i] = (struct nvmlDevice_st){ i, -1, -1 };
            for (int gi = 0; gi < MAX_GI; gi++)
                for (int ci = 0; ci < MAX_CI; ci++)
                    mig_devices[i][gi][ci] = (struct nvmlDevice_st){ i, gi, ci };
        }
    }
    if (path == NULL || stat(path, &now) != 0) {
        if (!loaded) /* no control file: one healthy GPU */
            parse_line(&st, strcpy(line, "gpu 0 GPU-00000000-fake-0000-0000-000000000000"));
        loaded = 1;
        return;
    }
    if (loaded && now.st_ino == seen.st_ino && now.st_size == seen.st_size &&
        now.st_mtim.tv_sec == seen.st_mtim.tv_sec && now.st_mtim.tv_nsec == seen.st_mtim.tv_nsec)
        return;
    if ((f = fopen(path, "r")) == NULL)
        return;
    memset(&next, 0, sizeof next);
    next.count = -1;
    while (fgets(line, sizeof line, f) != NULL)
        parse_line(&next, line);
    fclose(f);
    for (int i = 0; i < MAX_GPUS; i++) {
        const struct gpu *was = &st.gpus[i], *is = &next.gpus[i];
        if ((was->lost && !is->lost) || (!was->present && is->present))
            generation[i]++;
    }
    st = next;
    seen = now;
    loaded = 1;
}

static int device_count(void) {
    int n = 0;
    for (int i = 0; i < MAX_GPUS; i++)
        if (st.gpus[i].present)
            n = i + 1;
    return st.count >= 0 ? st.count : n;
}

static const struct fault *find(const struct fault *faults, int n, const char *function, int gpu) {
    for (int i = 0; i < n; i++)
        if (strcmp(faults[i].function, function) == 0 && (faults[i].gpu == -1 || faults[i].gpu == gpu))
            return &faults[i];
    return NULL;
}

static void log_call(const char *function, int gpu) {
    const char *path = getenv("FAKENVML_LOG");
    char line[96];
    for (int i = 0; path != NULL && i < st.nlogs; i++) {
        if (strcmp(st.logs[i], "*") == 0 || strcmp(st.logs[i], function) == 0) {
            int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
            int len = snprintf(line, sizeof line, "%s %d\n", function, gpu);
            if (fd >= 0) {
                if (write(fd, line, (size_t)len) != len)
                    perror("fakenvml: log");
                close(fd);
            }
            return;
        }
    }
}

/* Every call starts here: wait out a hang, log, then the faults. Returns with mu held. */
static nvmlReturn_t enter(const char *function, int gpu) {
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    pthread_mutex_lock(&mu);
    for (;;) {
        reload();
        const struct fault *hang = find(st.hangs, st.nhangs, function, gpu);
        if (hang == NULL || (hang->value > 0 && ms_since(&t0) >= hang->value))
            break;
        pthread_mutex_unlock(&mu);
        sleep_ms(5);
        pthread_mutex_lock(&mu);
    }
    log_call(function, gpu);
    const struct fault *error = find(st.errors, st.nerrors, function, gpu);
    if (error != NULL)
        return (nvmlReturn_t)error->value;
    if (!initialized)
        return NVML_ERROR_UNINITIALIZED;
    if (gpu >= 0 && (gpu >= device_count() || !st.gpus[gpu].present || st.gpus[gpu].lost))
        return NVML_ERROR_GPU_IS_LOST;
    return NVML_SUCCESS;
}

static nvmlReturn_t leave(nvmlReturn_t rc) {
    pthread_mutex_unlock(&mu);
    return rc;
}

static int is_mig_handle(nvmlDevice_t device) {
    const struct nvmlDevice_st *first = &mig_devices[0][0][0];
    return device >= first && device < first + MAX_GPUS * MAX_GI * MAX_CI;
}

/* The GPU of a handle (a MIG device's parent); -1 for what is no handle of ours. */
static int index_of(nvmlDevice_t device) {
    return (device >= devices && device < devices + MAX_GPUS) || is_mig_handle(device) ? device->index : -1;
}

static int mig_enabled(int gpu) {
    int with_devices = 0;
    for (int i = 0; i < st.nmigs; i++)
        with_devices |= st.migs[i].gpu == gpu;
    return st.mig_mode[gpu][0] ? st.mig_mode[gpu][1] == 1 : with_devices;
}

/* The MIG device behind a MIG handle, NULL when it is gone (or the GPU left MIG mode). */
static const struct mig *mig_of(nvmlDevice_t device) {
    for (int i = 0; mig_enabled(device->index) && i < st.nmigs; i++) {
        const struct mig *m = &st.migs[i];
        if (m->gpu == device->index && (int)m->gi == device->gi && (int)m->ci == device->ci)
            return m;
    }
    return NULL;
}

/* The start of a device query that a MIG device answers too: `g` is the GPU, `gpu` its index,
 * `m` the MIG device (NULL on a GPU's own handle). */
#define ANY_DEVICE_CALL(device)                                      \
    int gpu = index_of(device);                                      \
    if (gpu < 0)                                                     \
        return NVML_ERROR_INVALID_ARGUMENT;                          \
    nvmlReturn_t entered = enter(__func__, gpu);                     \
    if (entered != NVML_SUCCESS)                                     \
        return leave(entered);                                       \
    const struct gpu *g = &st.gpus[gpu];                             \
    const struct mig *m = is_mig_handle(device) ? mig_of(device) : NULL; \
    if (is_mig_handle(device) && m == NULL)                          \
        return leave(NVML_ERROR_NOT_FOUND);                          \
    (void)g, (void)m

/* The start of every other device query: a MIG device does not answer it. */
#define DEVICE_CALL(device)                                          \
    ANY_DEVICE_CALL(device);                                         \
    if (m != NULL)                                                   \
        return leave(NVML_ERROR_NOT_SUPPORTED)

static nvmlReturn_t copy_string(char *out, unsigned int length, const char *value) {
    if (out == NULL || length <= strlen(value))
        return leave(NVML_ERROR_INSUFFICIENT_SIZE);
    strcpy(out, value);
    return leave(NVML_SUCCESS);
}

/* -- library lifetime ----------------------------------------------------------------------- */

nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    pthread_mutex_lock(&mu);
    reload();
    long delay = st.init_delay_ms;
    pthread_mutex_unlock(&mu);
    sleep_ms(delay);
    initialized++; /* enter() refuses calls before init: let it through, then undo on error */
    nvmlReturn_t rc = enter(__func__, -1);
    if (rc == NVML_SUCCESS && st.init_error != 0)
        rc = st.init_error;
    if (rc != NVML_SUCCESS)
        initialized--;
    return leave(rc);
}

nvmlReturn_t nvmlInit_v2(void) { return nvmlInitWithFlags(0); }

nvmlReturn_t nvmlShutdown(void) {
    nvmlReturn_t rc = enter(__func__, -1);
    if (rc == NVML_SUCCESS)
        initialized--;
    return leave(rc);
}

const char *nvmlErrorString(nvmlReturn_t result) {
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_NOT_FOUND: return "Not Found";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case 9: return "Driver Not Loaded";
    case NVML_ERROR_TIMEOUT: return "Timeout";
    case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
    case NVML_ERROR_ARGUMENT_VERSION_MISMATCH: return "Argument version mismatch";
    case NVML_ERROR_UNKNOWN: return "Unknown Error";
    default: return "Fake NVML error";
    }
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    nvmlReturn_t rc = enter(__func__, -1);
    return rc != NVML_SUCCESS ? leave(rc) : copy_string(version, length, "550.54.15");
}

nvmlReturn_t nvmlSystemGetCudaDriverVersion(int *version) {
    nvmlReturn_t rc = enter(__func__, -1);
    if (rc == NVML_SUCCESS)
        *version = 12040;
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    nvmlReturn_t rc = enter(__func__, -1);
    if (rc == NVML_SUCCESS)
        *count = (unsigned)device_count();
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    if (index >= MAX_GPUS)
        return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t rc = enter(__func__, (int)index);
    if (rc == NVML_ERROR_GPU_IS_LOST && (int)index >= device_count())
        rc = NVML_ERROR_INVALID_ARGUMENT;
    if (rc == NVML_SUCCESS)
        *device = &devices[index];
    return leave(rc);
}

/* -- device queries: one answer each ------------------------------------------------------- */

/* A query with one result: `g` is the GPU, `gpu` its index. */
#define QUERY(function, type, value)                                   \
    nvmlReturn_t function(nvmlDevice_t device, type *out) {            \
        DEVICE_CALL(device);                                           \
        *out = (value);                                                \
        return leave(NVML_SUCCESS);                                    \
    }
/* A string into the caller's buffer. */
#define STRING_QUERY(function, value)                                  \
    nvmlReturn_t function(nvmlDevice_t device, char *out, unsigned int length) { \
        DEVICE_CALL(device);                                           \
        return copy_string(out, length, value);                        \
    }

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *out, unsigned int length) {
    ANY_DEVICE_CALL(device);
    return copy_string(out, length, m != NULL ? m->uuid : g->uuid);
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *out, unsigned int length) {
    char name[NAME_LEN + 40];
    ANY_DEVICE_CALL(device);
    snprintf(name, sizeof name, "%s%s%s", g->name, m != NULL && m->profile[0] ? " MIG " : "",
             m != NULL ? m->profile : "");
    return copy_string(out, length, name);
}
STRING_QUERY(nvmlDeviceGetVbiosVersion, "96.00.99.00.01")
QUERY(nvmlDeviceGetComputeMode, int, 0)
QUERY(nvmlDeviceGetPowerUsage, unsigned int, 70000u + 1000u * (unsigned)gpu + 2000u * g->util) /* mW */
QUERY(nvmlDeviceGetEnforcedPowerLimit, unsigned int, 350000)
QUERY(nvmlDeviceGetTotalEnergyConsumption, unsigned long long,
      1000000ULL * (unsigned)gpu + 70ULL * (unsigned long long)ms_since(&started)) /* mJ */
QUERY(nvmlDeviceGetFanSpeed, unsigned int, 30)
QUERY(nvmlDeviceGetPerformanceState, int, g->util > 0 ? 0 : 8)
QUERY(nvmlDeviceGetSupportedClocksEventReasons, unsigned long long, 0x1ff)
QUERY(nvmlDeviceGetCurrentClocksEventReasons, unsigned long long, g->util > 0 ? 0 : 0x1) /* idle */

nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t device, nvmlPciInfo_t *pci) {
    DEVICE_CALL(device);
    memset(pci, 0, sizeof *pci);
    pci->bus = 0x10u + (unsigned)gpu, pci->pciDeviceId = 0x233010DE, pci->pciSubSystemId = 0x16C110DE;
    snprintf(pci->busId, sizeof pci->busId, "00000000:%02X:00.0", pci->bus);
    snprintf(pci->busIdLegacy, sizeof pci->busIdLegacy, "0000:%02X:00.0", pci->bus);
    return leave(NVML_SUCCESS);
}

/* -- MIG ------------------------------------------------------------------------------------ */

nvmlReturn_t nvmlDeviceGetMigMode(nvmlDevice_t device, unsigned int *current, unsigned int *pending) {
    DEVICE_CALL(device);
    *current = (unsigned)mig_enabled(gpu);
    *pending = st.mig_mode[gpu][0] ? (unsigned)st.mig_mode[gpu][2] : *current;
    return leave(NVML_SUCCESS);
}

QUERY(nvmlDeviceGetMaxMigDeviceCount, unsigned int, MAX_MIG)

nvmlReturn_t nvmlDeviceGetMigDeviceHandleByIndex(nvmlDevice_t device, unsigned int index, nvmlDevice_t *mig) {
    DEVICE_CALL(device);
    if (!mig_enabled(gpu) || mig == NULL)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    for (int i = 0, n = 0; i < st.nmigs; i++) {
        const struct mig *found = &st.migs[i];
        if (found->gpu == gpu && (unsigned)n++ == index) {
            *mig = &mig_devices[gpu][found->gi][found->ci];
            return leave(NVML_SUCCESS);
        }
    }
    return leave(index < MAX_MIG ? NVML_ERROR_NOT_FOUND : NVML_ERROR_INVALID_ARGUMENT);
}

nvmlReturn_t nvmlDeviceIsMigDeviceHandle(nvmlDevice_t device, unsigned int *is_mig) {
    ANY_DEVICE_CALL(device);
    *is_mig = m != NULL;
    return leave(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetDeviceHandleFromMigDeviceHandle(nvmlDevice_t device, nvmlDevice_t *parent) {
    ANY_DEVICE_CALL(device);
    if (m == NULL)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    *parent = &devices[gpu];
    return leave(NVML_SUCCESS);
}

#define INSTANCE_QUERY(function, member)                               \
    nvmlReturn_t function(nvmlDevice_t device, unsigned int *id) {     \
        ANY_DEVICE_CALL(device);                                       \
        if (m == NULL) /* a GPU's own handle */                        \
            return leave(NVML_ERROR_INVALID_ARGUMENT);                 \
        *id = m->member;                                               \
        return leave(NVML_SUCCESS);                                    \
    }
INSTANCE_QUERY(nvmlDeviceGetGpuInstanceId, gi)
INSTANCE_QUERY(nvmlDeviceGetComputeInstanceId, ci)

/* The GPU instance of a MIG device: its first line (compute instances share its memory). */
static const struct mig *gpu_instance(const struct mig *m) {
    for (int i = 0; i < st.nmigs; i++)
        if (st.migs[i].gpu == m->gpu && st.migs[i].gi == m->gi)
            return &st.migs[i];
    return m;
}

nvmlReturn_t nvmlDeviceGetAttributes_v2(nvmlDevice_t device, nvmlDeviceAttributes_t *attributes) {
    ANY_DEVICE_CALL(device);
    const struct mig *gi = m != NULL ? gpu_instance(m) : NULL;
    unsigned slices = gi != NULL ? gi->slices : MAX_MIG;
    memset(attributes, 0, sizeof *attributes);
    attributes->multiprocessorCount = SM_PER_SLICE * (m != NULL ? m->slices : slices);
    attributes->sharedCopyEngineCount = slices, attributes->sharedDecoderCount = slices;
    attributes->gpuInstanceSliceCount = slices;
    attributes->computeInstanceSliceCount = m != NULL ? m->slices : slices;
    attributes->memorySizeMB = (gi != NULL ? gi->total : g->total) / MIB;
    return leave(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device, nvmlUtilization_t *utilization) {
    DEVICE_CALL(device);
    if (mig_enabled(gpu))
        return leave(NVML_ERROR_NOT_SUPPORTED);
    utilization->gpu = g->util, utilization->memory = g->util / 2;
    return leave(NVML_SUCCESS);
}

static unsigned long long reserved(const struct gpu *g) { return g->total > 512 * MIB ? 256 * MIB : 0; }

/* A MIG device's memory is its GPU instance's, without a reserve. */
nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory) {
    ANY_DEVICE_CALL(device);
    const struct mig *gi = m != NULL ? gpu_instance(m) : NULL;
    memory->total = gi != NULL ? gi->total : g->total;
    memory->used = gi != NULL ? gi->used : g->used + reserved(g);
    memory->free = memory->total - memory->used;
    return leave(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory) {
    ANY_DEVICE_CALL(device);
    if (memory->version != MEMORY_V2)
        return leave(NVML_ERROR_ARGUMENT_VERSION_MISMATCH);
    const struct mig *gi = m != NULL ? gpu_instance(m) : NULL;
    memory->total = gi != NULL ? gi->total : g->total;
    memory->reserved = gi != NULL ? 0 : reserved(g);
    memory->used = gi != NULL ? gi->used : g->used;
    memory->free = memory->total - memory->used - memory->reserved;
    return leave(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t device, int sensor, unsigned int *temp) {
    DEVICE_CALL(device);
    if (sensor != 0) /* NVML_TEMPERATURE_GPU */
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    *temp = 40u + (unsigned)gpu + g->util / 5;
    return leave(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetTemperatureThreshold(nvmlDevice_t device, int threshold, unsigned int *temp) {
    DEVICE_CALL(device);
    if (threshold > 1) /* SHUTDOWN 0, SLOWDOWN 1 */
        return leave(NVML_ERROR_NOT_SUPPORTED);
    *temp = threshold == 0 ? 95 : 90;
    return leave(NVML_SUCCESS);
}

#define CODEC_QUERY(function)                                                        \
    nvmlReturn_t function(nvmlDevice_t device, unsigned *util, unsigned *period_us) { \
        DEVICE_CALL(device);                                                         \
        if (mig_enabled(gpu))                                                        \
            return leave(NVML_ERROR_NOT_SUPPORTED);                                  \
        *util = 0, *period_us = 167000;                                              \
        return leave(NVML_SUCCESS);                                                  \
    }
CODEC_QUERY(nvmlDeviceGetEncoderUtilization)
CODEC_QUERY(nvmlDeviceGetDecoderUtilization)

/* MHz of nvmlClockType_t GRAPHICS, SM, MEM, VIDEO: now and at most */
static const unsigned clocks[2][4] = { { 1410, 1410, 1215, 1275 }, { 1980, 1980, 1593, 1710 } };
#define CLOCK_QUERY(function, which)                                        \
    nvmlReturn_t function(nvmlDevice_t device, int type, unsigned int *mhz) { \
        DEVICE_CALL(device);                                                \
        if (type < 0 || type > 3)                                           \
            return leave(NVML_ERROR_INVALID_ARGUMENT);                      \
        *mhz = clocks[which][type];                                         \
        return leave(NVML_SUCCESS);                                         \
    }
CLOCK_QUERY(nvmlDeviceGetClockInfo, 0)
CLOCK_QUERY(nvmlDeviceGetMaxClockInfo, 1)

nvmlReturn_t nvmlDeviceGetTotalEccErrors(nvmlDevice_t device, int type, int counter, unsigned long long *count) {
    DEVICE_CALL(device);
    (void)type, (void)counter;
    *count = 0;
    return leave(NVML_SUCCESS);
}

/* -- health: PCIe link, row remapping -------------------------------------------------------- */

#define PCIE_MAX_GENERATION 5u
#define PCIE_MAX_WIDTH 16u
QUERY(nvmlDeviceGetMaxPcieLinkGeneration, unsigned int, PCIE_MAX_GENERATION)
QUERY(nvmlDeviceGetMaxPcieLinkWidth, unsigned int, PCIE_MAX_WIDTH)
QUERY(nvmlDeviceGetCurrPcieLinkGeneration, unsigned int,
      st.pcie[gpu][0] ? st.pcie[gpu][0] : PCIE_MAX_GENERATION)
QUERY(nvmlDeviceGetCurrPcieLinkWidth, unsigned int, st.pcie[gpu][1] ? st.pcie[gpu][1] : PCIE_MAX_WIDTH)

/* NVML_FI_DEV_* ids of nvml.h */
enum {
    FI_ECC_CURRENT = 1, FI_ECC_SBE_VOL = 3, FI_ECC_DBE_VOL = 4, FI_ECC_SBE_AGG = 5, FI_ECC_DBE_AGG = 6,
    FI_RETIRED_SBE = 29, FI_RETIRED_DBE = 30, FI_RETIRED_PENDING = 31,
    FI_NVLINK_CRC_FLIT = 38, FI_NVLINK_CRC_DATA = 45, FI_NVLINK_REPLAY = 52, FI_NVLINK_RECOVERY = 59,
    FI_ENERGY = 83, FI_NVLINK_LINK_COUNT = 91, FI_PCIE_REPLAY = 94,
    FI_REMAPPED_COR = 142, FI_REMAPPED_UNC = 143, FI_REMAPPED_PENDING = 144, FI_REMAPPED_FAILURE = 145,
    FI_NVLINK_STATE = 165, FI_POWER_AVERAGE = 185, FI_POWER_INSTANT = 186, FI_POWER_LIMIT = 190,
};
enum { VALUE_UNSIGNED_LONG_LONG = 3 };

typedef struct {
    unsigned int fieldId, scopeId;
    long long timestamp, latencyUsec;
    int valueType;
    nvmlReturn_t nvmlReturn;
    union { double dVal; unsigned int uiVal; unsigned long ulVal; unsigned long long ullVal;
            long long sllVal; int siVal; unsigned short usVal; } value;
} nvmlFieldValue_t;

/* The function that reads the field alone: its "hang" and "error" lines apply to the field. */
static const char *field_function(unsigned id) {
    switch (id) {
    case FI_POWER_AVERAGE: case FI_POWER_INSTANT: return "nvmlDeviceGetPowerUsage";
    case FI_POWER_LIMIT: return "nvmlDeviceGetEnforcedPowerLimit";
    case FI_ENERGY: return "nvmlDeviceGetTotalEnergyConsumption";
    case FI_ECC_CURRENT: case FI_ECC_SBE_VOL: case FI_ECC_DBE_VOL: case FI_ECC_SBE_AGG:
    case FI_ECC_DBE_AGG: return "nvmlDeviceGetTotalEccErrors";
    case FI_REMAPPED_COR: case FI_REMAPPED_UNC: case FI_REMAPPED_PENDING:
    case FI_REMAPPED_FAILURE: return "nvmlDeviceGetRemappedRows";
    case FI_PCIE_REPLAY: return "nvmlDeviceGetPcieReplayCounter";
    default: return "";
    }
}

static const struct field *find_field(const struct field *fields, int n, unsigned id, int gpu) {
    for (int i = 0; i < n; i++)
        if (fields[i].id == id && (fields[i].gpu == -1 || fields[i].gpu == gpu))
            return &fields[i];
    return NULL;
}

static unsigned long long power_mw(int gpu, const struct gpu *g) { return 70000u + 1000u * (unsigned)gpu + 2000u * g->util; }

/* A field's value as the control file and the defaults give it; NOT_SUPPORTED if none. */
static nvmlReturn_t field_value(int gpu, const struct gpu *g, unsigned id, unsigned scope, unsigned long long *out) {
    const struct field *set = find_field(st.fields, st.nfields, id, gpu);
    const struct field *links = find_field(st.fields, st.nfields, FI_NVLINK_LINK_COUNT, gpu);
    if (set != NULL && id != FI_NVLINK_STATE) {
        *out = (unsigned long long)set->value;
        return NVML_SUCCESS;
    }
    switch (id) {
    case FI_POWER_AVERAGE: case FI_POWER_INSTANT: *out = power_mw(gpu, g); return NVML_SUCCESS;
    case FI_POWER_LIMIT: *out = 350000; return NVML_SUCCESS;
    case FI_ENERGY: *out = 1000000ULL * (unsigned)gpu + 70ULL * (unsigned long long)ms_since(&started); return NVML_SUCCESS;
    case FI_ECC_CURRENT: *out = 1; return NVML_SUCCESS;
    case FI_ECC_SBE_VOL: case FI_ECC_DBE_VOL: case FI_ECC_SBE_AGG: case FI_ECC_DBE_AGG:
    case FI_REMAPPED_COR: case FI_REMAPPED_UNC: case FI_REMAPPED_PENDING: case FI_REMAPPED_FAILURE:
    case FI_PCIE_REPLAY:
        *out = 0;
        return NVML_SUCCESS;
    case FI_NVLINK_CRC_FLIT: case FI_NVLINK_CRC_DATA: case FI_NVLINK_REPLAY: case FI_NVLINK_RECOVERY:
        *out = 0;
        return links != NULL && links->value > 0 ? NVML_SUCCESS : NVML_ERROR_NOT_SUPPORTED;
    case FI_NVLINK_STATE: /* "field <gpu> 165 <n>": the last n links are down */
        if (links == NULL || (long long)scope >= links->value)
            return links == NULL ? NVML_ERROR_NOT_SUPPORTED : NVML_ERROR_INVALID_ARGUMENT;
        *out = set != NULL && (long long)scope >= links->value - set->value ? 0 : 1;
        return NVML_SUCCESS;
    default:
        return NVML_ERROR_NOT_SUPPORTED;
    }
}

nvmlReturn_t nvmlDeviceGetFieldValues(nvmlDevice_t device, int count, nvmlFieldValue_t *values) {
    DEVICE_CALL(device);
    if (count < 0 || (count > 0 && values == NULL))
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    for (int i = 0; i < count; i++) { /* a hung field hangs the call */
        const char *function = field_function(values[i].fieldId);
        while (find(st.hangs, st.nhangs, function, gpu) != NULL) {
            pthread_mutex_unlock(&mu);
            sleep_ms(5);
            pthread_mutex_lock(&mu);
            reload();
        }
    }
    g = &st.gpus[gpu];
    for (int i = 0; i < count; i++) {
        nvmlFieldValue_t *v = &values[i];
        const struct fault *error = find(st.errors, st.nerrors, field_function(v->fieldId), gpu);
        const struct field *field_error = find_field(st.field_errors, st.nfield_errors, v->fieldId, gpu);
        unsigned long long value = 0;
        v->timestamp = ms_since(&started) * 1000, v->latencyUsec = 0;
        v->valueType = VALUE_UNSIGNED_LONG_LONG;
        v->nvmlReturn = field_error != NULL ? (nvmlReturn_t)field_error->value
                        : error != NULL ? (nvmlReturn_t)error->value
                        : field_value(gpu, g, v->fieldId, v->scopeId, &value);
        v->value.ullVal = v->nvmlReturn == NVML_SUCCESS ? value : 0;
    }
    return leave(NVML_SUCCESS);
}

static unsigned field_or_zero(int gpu, const struct gpu *g, unsigned id) {
    unsigned long long value = 0;
    return field_value(gpu, g, id, 0, &value) == NVML_SUCCESS ? (unsigned)value : 0;
}

nvmlReturn_t nvmlDeviceGetRemappedRows(nvmlDevice_t device, unsigned int *corrected, unsigned int *uncorrected,
                                       unsigned int *pending, unsigned int *failure) {
    DEVICE_CALL(device);
    *corrected = field_or_zero(gpu, g, FI_REMAPPED_COR), *uncorrected = field_or_zero(gpu, g, FI_REMAPPED_UNC);
    *pending = field_or_zero(gpu, g, FI_REMAPPED_PENDING), *failure = field_or_zero(gpu, g, FI_REMAPPED_FAILURE);
    return leave(NVML_SUCCESS);
}

QUERY(nvmlDeviceGetPcieReplayCounter, unsigned int, field_or_zero(gpu, g, FI_PCIE_REPLAY))

/* Page retirement: NOT_SUPPORTED, as on an A100 or H100 (row remapping took its place). */
nvmlReturn_t nvmlDeviceGetRetiredPages(nvmlDevice_t device, int cause, unsigned int *count,
                                       unsigned long long *addresses) {
    DEVICE_CALL(device);
    (void)cause, (void)count, (void)addresses;
    return leave(NVML_ERROR_NOT_SUPPORTED);
}

nvmlReturn_t nvmlDeviceGetRetiredPagesPendingStatus(nvmlDevice_t device, int *pending) {
    DEVICE_CALL(device);
    (void)pending;
    return leave(NVML_ERROR_NOT_SUPPORTED);
}

/* -- running processes: the count-then-fill protocol of every variant -------------------------- */

static nvmlReturn_t processes(nvmlDevice_t device, const char *function, int graphics,
                              unsigned int *count, void *infos, size_t size) {
    int gpu = index_of(device);
    if (gpu < 0 || count == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t rc = enter(function, gpu);
    if (rc != NVML_SUCCESS)
        return leave(rc);
    const struct mig *m = is_mig_handle(device) ? mig_of(device) : NULL;
    if (is_mig_handle(device) && m == NULL)
        return leave(NVML_ERROR_NOT_FOUND);
    int mig = mig_enabled(gpu); /* else the instance ids are NO_INSTANCE */
    unsigned n = 0, room = infos == NULL ? 0 : *count;
    for (int i = 0; i < st.nprocs; i++) {
        const struct proc *p = &st.procs[i];
        if (p->gpu != gpu || p->graphics != graphics || (m != NULL && (p->gi != m->gi || p->ci != m->ci)))
            continue;
        if (n < room) {
            nvmlProcessInfo_v2_t info = { p->pid, p->used, mig ? p->gi : NO_INSTANCE, mig ? p->ci : NO_INSTANCE };
            memcpy((char *)infos + n * size, &info, size); /* v1 is v2's first fields */
        }
        n++;
    }
    *count = n;
    return leave(n > room ? NVML_ERROR_INSUFFICIENT_SIZE : NVML_SUCCESS);
}

#define PROCESS_QUERY(kind, graphics, suffix, type)                                           \
    nvmlReturn_t nvmlDeviceGet##kind##RunningProcesses##suffix(nvmlDevice_t device,           \
                                                               unsigned int *count, type *infos) { \
        return processes(device, __func__, graphics, count, infos, sizeof(type));             \
    }
PROCESS_QUERY(Compute, 0, _v3, nvmlProcessInfo_v2_t)
PROCESS_QUERY(Compute, 0, _v2, nvmlProcessInfo_v2_t)
PROCESS_QUERY(Compute, 0, , nvmlProcessInfo_v1_t)
PROCESS_QUERY(Graphics, 1, _v3, nvmlProcessInfo_v2_t)
PROCESS_QUERY(Graphics, 1, _v2, nvmlProcessInfo_v2_t)
PROCESS_QUERY(Graphics, 1, , nvmlProcessInfo_v1_t)

/* -- Xid events ------------------------------------------------------------------------------- */

nvmlReturn_t nvmlEventSetCreate(nvmlEventSet_t *set) {
    nvmlReturn_t rc = enter(__func__, -1);
    if (rc == NVML_SUCCESS && (*set = calloc(1, sizeof **set)) == NULL)
        rc = NVML_ERROR_UNKNOWN;
    return leave(rc);
}

nvmlReturn_t nvmlDeviceRegisterEvents(nvmlDevice_t device, unsigned long long types, nvmlEventSet_t set) {
    DEVICE_CALL(device);
    if (set == NULL || !(types & XID_EVENT))
        return leave(set == NULL ? NVML_ERROR_INVALID_ARGUMENT : NVML_ERROR_NOT_SUPPORTED);
    set->registered[gpu] = 1, set->generation[gpu] = generation[gpu];
    return leave(NVML_SUCCESS);
}

/* The first Xid event of the control file not yet delivered whose GPU the set watches. */
static const struct xid *next_xid(nvmlEventSet_t set, char *key, size_t size) {
    for (int i = 0; i < st.nxids; i++) {
        const struct xid *x = &st.xids[i];
        int seen_before = 0;
        if (x->gpu < 0 || x->gpu >= MAX_GPUS || !set->registered[x->gpu] ||
            set->generation[x->gpu] != generation[x->gpu])
            continue;
        snprintf(key, size, "%d:%s", x->gpu, x->id);
        for (int j = 0; j < ndelivered && j < MAX_ITEMS; j++)
            seen_before |= strcmp(delivered[j], key) == 0;
        if (!seen_before)
            return x;
    }
    return NULL;
}

nvmlReturn_t nvmlEventSetWait_v2(nvmlEventSet_t set, nvmlEventData_t *data, unsigned int timeout_ms) {
    struct timespec t0;
    char key[40];
    clock_gettime(CLOCK_MONOTONIC, &t0);
    if (set == NULL || data == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    for (;;) {
        nvmlReturn_t rc = enter(__func__, -1);
        if (rc != NVML_SUCCESS)
            return leave(rc);
        const struct xid *x = next_xid(set, key, sizeof key);
        if (x != NULL) {
            snprintf(delivered[ndelivered++ % MAX_ITEMS], sizeof delivered[0], "%s", key);
            data->device = &devices[x->gpu], data->eventType = XID_EVENT, data->eventData = x->code;
            data->gpuInstanceId = data->computeInstanceId = 0xFFFFFFFFu;
            return leave(NVML_SUCCESS);
        }
        leave(NVML_SUCCESS);
        if (ms_since(&t0) >= (long)timeout_ms)
            return NVML_ERROR_TIMEOUT;
        sleep_ms(10);
    }
}

nvmlReturn_t nvmlEventSetFree(nvmlEventSet_t set) {
    nvmlReturn_t rc = enter(__func__, -1);
    if (rc == NVML_SUCCESS)
        free(set);
    return leave(rc);
}
