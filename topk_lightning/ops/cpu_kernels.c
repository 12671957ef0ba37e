/* CPU kernels of top-k attention, compiled on first use by `cpu_kernels.py`: an exact row-wise top-k, and the whole
 * fp32 forward built on it (at the end of the file).
 *
 * The selection. torch.topk spends ~4 ns per score it reads on a CPU; this reads each row twice, in cache:
 *   1. the maxima of G >= k strided groups (element i is in group i % G), vectorised;
 *   2. tau = the k-th largest of those maxima: a lower bound of the row's k-th largest score, since k distinct
 *      groups each hold a score >= tau;
 *   3. the scores >= tau (typically a few k of them) are copied out branch-free, and a quickselect among them
 *      finds the k-th largest t; the output is every candidate > t, then candidates == t in index order.
 * Exact, ties at the k-th place broken towards lower indices. A row holding a NaN makes the call return 1 so that
 * the caller falls back to torch.topk (which ranks NaN first). Rows are split among POSIX threads.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>


#define MAX_THREADS 64

/* Run work(jobs + t * job_size) for t < threads, job 0 on the calling thread (a failed pthread_create runs its job
 * there too). */
static void run_threads(void *(*work)(void *), char *jobs, size_t job_size, int64_t threads) {
    pthread_t handles[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int64_t t = 1; t < threads; t++) {
        started[t] = pthread_create(&handles[t], NULL, work, jobs + t * job_size) == 0;
        if (!started[t]) work(jobs + t * job_size);
    }
    work(jobs);
    for (int64_t t = 1; t < threads; t++) {
        if (started[t]) pthread_join(handles[t], NULL);
    }
}

static int64_t thread_count(int64_t threads, int64_t rows) {
    if (threads > rows) threads = rows;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    return threads < 1 ? 1 : threads;
}

#define DEFINE_KTH_LARGEST(T, NAME)                                                                     \
    /* The k-th largest (k >= 1) of a[0..n), reordering a. Hoare partition, median-of-three pivot. */  \
    static T NAME(T *a, int64_t n, int64_t k) {                                                         \
        int64_t lo = 0, hi = n - 1, target = k - 1;                                                     \
        while (lo < hi) {                                                                               \
            T x = a[lo], y = a[lo + (hi - lo) / 2], z = a[hi];                                          \
            T pivot = x > y ? (y > z ? y : (x > z ? z : x)) : (x > z ? x : (y > z ? z : y));            \
            int64_t i = lo, j = hi;                                                                     \
            while (i <= j) {                                                                            \
                while (a[i] > pivot) i++;                                                               \
                while (a[j] < pivot) j--;                                                               \
                if (i <= j) {                                                                           \
                    T t = a[i]; a[i] = a[j]; a[j] = t;                                                  \
                    i++; j--;                                                                           \
                }                                                                                       \
            }                                                                                           \
            if (target <= j) hi = j;                                                                    \
            else if (target >= i) lo = i;                                                               \
            else return a[target]; /* between j and i everything equals the pivot */                   \
        }                                                                                               \
        return a[target];                                                                               \
    }

#define DEFINE_ROW_SELECTION(T, SUFFIX)                                                                     \
    DEFINE_KTH_LARGEST(T, kth_largest_##SUFFIX)                                                         \
                                                                                                        \
    /* maxima[g] = the largest row[i] with i % groups == g (groups <= n), vectorised over g. */         \
    static void group_maxima_##SUFFIX(const T *row, int64_t n, int64_t groups, T *maxima) {             \
        for (int64_t g = 0; g < groups; g++) maxima[g] = row[g];                                        \
        for (int64_t start = groups; start < n; start += groups) {                                      \
            int64_t width = n - start < groups ? n - start : groups;                                    \
            const T *chunk = row + start;                                                               \
            for (int64_t g = 0; g < width; g++) maxima[g] = chunk[g] > maxima[g] ? chunk[g] : maxima[g]; \
        }                                                                                               \
    }                                                                                                   \
                                                                                                        \
    /* One row; scratch holds 2n + G values and n indices. Returns 1 if the row holds a NaN. */         \
    static int topk_row_##SUFFIX(const T *row, int64_t n, int64_t k, int64_t groups, T *out_val,        \
                                 int64_t *out_idx, T *cand_val, int64_t *cand_idx, T *work) {           \
        int64_t count = 0, nans = 0;                                                                    \
        if (groups >= k && groups < n) {                                                                \
            T *maxima = work + n;                                                                       \
            group_maxima_##SUFFIX(row, n, groups, maxima);                                              \
            T tau = kth_largest_##SUFFIX(maxima, groups, k);                                            \
            for (int64_t i = 0; i < n; i++) {                                                           \
                T x = row[i];                                                                           \
                cand_val[count] = x;                                                                    \
                cand_idx[count] = i;                                                                    \
                count += x >= tau;                                                                      \
                nans += x != x;                                                                         \
            }                                                                                           \
        } else {                                                                                        \
            for (int64_t i = 0; i < n; i++) {                                                           \
                T x = row[i];                                                                           \
                cand_val[count] = x;                                                                    \
                cand_idx[count] = i;                                                                    \
                count += x == x;                                                                        \
                nans += x != x;                                                                         \
            }                                                                                           \
        }                                                                                               \
        if (nans || count < k) return 1;                                                                \
        for (int64_t j = 0; j < count; j++) work[j] = cand_val[j];                                      \
        T t = kth_largest_##SUFFIX(work, count, k);                                                     \
        int64_t o = 0;                                                                                  \
        for (int64_t j = 0; j < count; j++) {                                                           \
            if (cand_val[j] > t) { out_val[o] = cand_val[j]; out_idx[o] = cand_idx[j]; o++; }           \
        }                                                                                               \
        for (int64_t j = 0; j < count && o < k; j++) {                                                  \
            if (cand_val[j] == t) { out_val[o] = cand_val[j]; out_idx[o] = cand_idx[j]; o++; }          \
        }                                                                                               \
        return 0;                                                                                       \
    }

#define DEFINE_ROW_JOBS(T, SUFFIX)                                                                      \
    typedef struct {                                                                                    \
        const T *scores; int64_t first, last, n, stride, k, groups; T *out_val; int64_t *out_idx; int status; \
    } job_##SUFFIX;                                                                                     \
                                                                                                        \
    static void *run_job_##SUFFIX(void *arg) {                                                          \
        job_##SUFFIX *job = (job_##SUFFIX *)arg;                                                        \
        int64_t n = job->n;                                                                             \
        T *values = (T *)malloc(sizeof(T) * (size_t)(3 * n + job->groups + 64));                         \
        int64_t *indices = (int64_t *)malloc(sizeof(int64_t) * (size_t)(n + 16));                       \
        if (!values || !indices) { free(values); free(indices); job->status = 2; return NULL; }          \
        job->status = 0;                                                                                \
        for (int64_t r = job->first; r < job->last && !job->status; r++) {                             \
            job->status = select_row_##SUFFIX(job->scores + r * job->stride, n, job->k, job->groups,    \
                                              job->out_val + r * job->k, job->out_idx + r * job->k,     \
                                              values, indices);                                         \
        }                                                                                               \
        free(values);                                                                                   \
        free(indices);                                                                                  \
        return NULL;                                                                                    \
    }                                                                                                   \
                                                                                                        \
    /* rows x n scores (row r starts at scores + r * stride) -> rows x k values and indices.            \
       Returns 0 on success, 1 if a row holds a NaN, 2 if memory ran out. */                            \
    int topk_rows_##SUFFIX(const T *scores, int64_t rows, int64_t n, int64_t stride, int64_t k,         \
                           int64_t groups, int64_t threads, T *out_val, int64_t *out_idx) {             \
        threads = thread_count(threads, rows);                                                          \
        job_##SUFFIX jobs[MAX_THREADS];                                                                 \
        for (int64_t t = 0; t < threads; t++) {                                                         \
            jobs[t] = (job_##SUFFIX){scores, rows * t / threads, rows * (t + 1) / threads, n, stride, k, \
                                     groups, out_val, out_idx, 0};                                      \
        }                                                                                               \
        run_threads(run_job_##SUFFIX, (char *)jobs, sizeof(jobs[0]), threads);                          \
        int status = 0;                                                                                 \
        for (int64_t t = 0; t < threads; t++) status = jobs[t].status > status ? jobs[t].status : status; \
        return status;                                                                                  \
    }

DEFINE_ROW_SELECTION(float, f32)
DEFINE_ROW_SELECTION(double, f64)

#if defined(__AVX512F__) && !defined(TOPK_PORTABLE)
#include <immintrin.h>
#define HAVE_AVX512 1

static inline __mmask16 low_lanes(int count) { return (__mmask16)((1u << count) - 1u); }

/* The k-th largest (k >= 1) of a[0..n): quickselect whose partition step is branch-free, 16 lanes at a time
   (compress the lanes above / below the pivot, write them to the two ends of the other buffer). a and spare both
   hold n values; both are overwritten. */
static float kth_largest_f32_avx512(float *a, float *spare, int64_t n, int64_t k) {
    for (;;) {
        if (n == 1) return a[0];
        float x = a[0], y = a[n / 2], z = a[n - 1];
        float pivot = x > y ? (y > z ? y : (x > z ? z : x)) : (x > z ? x : (y > z ? z : y));
        __m512 p = _mm512_set1_ps(pivot);
        int64_t above = 0, below = 0;
        for (int64_t i = 0; i < n; i += 16) {
            __mmask16 valid = n - i >= 16 ? (__mmask16)0xFFFF : low_lanes((int)(n - i));
            __m512 v = _mm512_maskz_loadu_ps(valid, a + i);
            __mmask16 gt = _mm512_mask_cmp_ps_mask(valid, v, p, _CMP_GT_OQ);
            __mmask16 lt = _mm512_mask_cmp_ps_mask(valid, v, p, _CMP_LT_OQ);
            int n_gt = __builtin_popcount(gt), n_lt = __builtin_popcount(lt);
            _mm512_mask_storeu_ps(spare + above, low_lanes(n_gt), _mm512_maskz_compress_ps(gt, v));
            below += n_lt;
            _mm512_mask_storeu_ps(spare + n - below, low_lanes(n_lt), _mm512_maskz_compress_ps(lt, v));
            above += n_gt;
        }
        int64_t equal = n - above - below;
        float *next = a;
        a = spare;
        spare = next;
        if (k <= above) {
            n = above;
        } else if (k <= above + equal) {
            return pivot;
        } else {
            k -= above + equal;
            a += n - below;
            n = below;
        }
    }
}

/* topk_row for float rows shorter than 2^31, with AVX-512. scratch: cand_val 2n + groups + 32 floats,
   cand_idx n + 16 int32. Returns 1 if the row holds a NaN. */
static int topk_row_f32_avx512(const float *row, int64_t n, int64_t k, int64_t groups, float *out_val,
                               int64_t *out_idx, float *cand_val, int32_t *cand_idx) {
    float *work = cand_val + n + 16;
    float tau = -INFINITY;
    if (groups >= k && groups < n) {
        float *maxima = work + n;
        group_maxima_f32(row, n, groups, maxima);
        tau = kth_largest_f32_avx512(maxima, work, groups, k);
    }
    __m512 t = _mm512_set1_ps(tau);
    __m512i index = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512i step = _mm512_set1_epi32(16);
    __mmask16 nans = 0;
    int64_t count = 0;
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 valid = n - i >= 16 ? (__mmask16)0xFFFF : low_lanes((int)(n - i));
        __m512 v = _mm512_maskz_loadu_ps(valid, row + i);
        __mmask16 keep = _mm512_mask_cmp_ps_mask(valid, v, t, _CMP_GE_OQ);
        nans |= _mm512_mask_cmp_ps_mask(valid, v, v, _CMP_UNORD_Q);
        int kept = __builtin_popcount(keep);
        _mm512_mask_storeu_ps(cand_val + count, low_lanes(kept), _mm512_maskz_compress_ps(keep, v));
        _mm512_mask_storeu_epi32(cand_idx + count, low_lanes(kept), _mm512_maskz_compress_epi32(keep, index));
        count += kept;
        index = _mm512_add_epi32(index, step);
    }
    if (nans || count < k) return 1;
    for (int64_t j = 0; j < count; j++) work[j] = cand_val[j];
    float kth = kth_largest_f32_avx512(work, work + count, count, k);
    int64_t o = 0;
    for (int64_t j = 0; j < count; j++) {
        float x = cand_val[j];
        out_val[o] = x;
        out_idx[o] = cand_idx[j];
        o += x > kth;
    }
    for (int64_t j = 0; j < count && o < k; j++) {
        if (cand_val[j] == kth) { out_val[o] = kth; out_idx[o] = cand_idx[j]; o++; }
    }
    return 0;
}
#endif

/* One row: values holds 3n + groups + 64 scalars, indices n + 16 int64. */
static int select_row_f32(const float *row, int64_t n, int64_t k, int64_t groups, float *out_val,
                          int64_t *out_idx, float *values, int64_t *indices) {
#ifdef HAVE_AVX512
    if (n < ((int64_t)1 << 31)) {
        return topk_row_f32_avx512(row, n, k, groups, out_val, out_idx, values, (int32_t *)indices);
    }
#endif
    return topk_row_f32(row, n, k, groups, out_val, out_idx, values, indices, values + n);
}

static int select_row_f64(const double *row, int64_t n, int64_t k, int64_t groups, double *out_val,
                          int64_t *out_idx, double *values, int64_t *indices) {
    return topk_row_f64(row, n, k, groups, out_val, out_idx, values, indices, values + n);
}

DEFINE_ROW_JOBS(float, f32)
DEFINE_ROW_JOBS(double, f64)

/* ---- Top-k attention forward, fp32. Per query row: select the k largest scores, softmax over them (zeros for a row
 * with no finite score), out = sum_j p_j * value[index_j]; the kept indices (int32) and probabilities are written
 * for the backward. */
typedef struct {
    float *values, *kept_val, *weight; int64_t *indices, *kept_idx;
} row_scratch;

static int scratch_alloc(row_scratch *s, int64_t n, int64_t k, int64_t groups) {
    s->values = (float *)malloc(sizeof(float) * (size_t)(3 * n + groups + 64 + 2 * k));
    s->indices = (int64_t *)malloc(sizeof(int64_t) * (size_t)(n + 16 + k));
    if (!s->values || !s->indices) { free(s->values); free(s->indices); return 2; }
    s->kept_val = s->values + 3 * n + groups + 64;
    s->weight = s->kept_val + k;
    s->kept_idx = s->indices + n + 16;
    return 0;
}

static void scratch_free(row_scratch *s) { free(s->values); free(s->indices); }

/* value_rows: this head's Lk x dim value rows. dropped (k flags) is NULL without dropout; otherwise the output sums
 * p_j * keep_scale over the entries not dropped (prob_out keeps p_j). index_out / prob_out may be NULL (nothing saved
 * for a backward). Returns 1 if the scores hold a NaN. */
static int attend_row(const float *scores, int64_t n, int64_t k, int64_t groups, const float *value_rows,
                      int64_t dim, const uint8_t *dropped, float keep_scale, row_scratch *s, float *out,
                      int32_t *index_out, float *prob_out) {
    if (select_row_f32(scores, n, k, groups, s->kept_val, s->kept_idx, s->values, s->indices)) return 1;
    float top = -INFINITY, total = 0.0f;
    for (int64_t j = 0; j < k; j++) top = s->kept_val[j] > top ? s->kept_val[j] : top;
    int attended = top != -INFINITY;
    for (int64_t j = 0; j < k; j++) {
        s->weight[j] = attended ? expf(s->kept_val[j] - top) : 0.0f;
        total += s->weight[j];
    }
    float inverse = attended ? 1.0f / total : 0.0f;
    for (int64_t d = 0; d < dim; d++) out[d] = 0.0f;
    for (int64_t j = 0; j < k; j++) {
        float p = s->weight[j] * inverse;
        if (index_out) {
            index_out[j] = (int32_t)s->kept_idx[j];
            prob_out[j] = p;
        }
        const float *value_row = value_rows + s->kept_idx[j] * dim;
        float w = dropped ? (dropped[j] ? 0.0f : p * keep_scale) : p;
        for (int64_t d = 0; d < dim; d++) out[d] += w * value_row[d];
    }
    return 0;
}

/* Queries and outputs are (BH, Lq, dim), kept_index / kept_prob (BH, Lq, k), values (B * Hkv, Lk, dim), keys
 * transposed and padded: (B * Hkv, dim, lk_padded) with lk_padded a multiple of KEY_BLOCK. key_bias (B, Lk) is
 * added to every score when given (0 or -inf for padding); causal masks key j > i + (Lk - Lq). dropped (BH, Lq, k)
 * flags the kept entries that dropout removes (NULL without dropout). Work is split by
 * blocks of ROW_BLOCK query rows of one head: their scores (ROW_BLOCK x Lk) are computed into a buffer that stays
 * in cache, then attended row by row. kept_index / kept_prob may be NULL when no backward will read them. */
#define ROW_BLOCK 4
#define KEY_BLOCK 32

typedef struct {
    const float *query, *key_t, *value, *key_bias; const uint8_t *dropped;
    int64_t heads, kv_heads, q_len, k_len, lk_padded, dim, k, groups, causal;
    float scale, keep_scale;
    float *out; int32_t *kept_index; float *kept_prob;
    int64_t first, last; int status;
} forward_job;

/* scores[r][j] = q_block[r] . key_t[:, j] for ROW_BLOCK rows and lk_padded keys, KEY_BLOCK keys at a time
 * (ROW_BLOCK x KEY_BLOCK accumulators, which the compiler keeps in vector registers). */
static void score_block(const float *q_block, const float *key_t, int64_t dim, int64_t lk_padded, float *scores) {
    for (int64_t j0 = 0; j0 < lk_padded; j0 += KEY_BLOCK) {
        float acc[ROW_BLOCK][KEY_BLOCK] = {{0}};
        for (int64_t d = 0; d < dim; d++) {
            const float *key_row = key_t + d * lk_padded + j0;
            for (int r = 0; r < ROW_BLOCK; r++) {
                float q = q_block[r * dim + d];
                for (int j = 0; j < KEY_BLOCK; j++) acc[r][j] += q * key_row[j];
            }
        }
        for (int r = 0; r < ROW_BLOCK; r++) {
            for (int j = 0; j < KEY_BLOCK; j++) scores[r * lk_padded + j0 + j] = acc[r][j];
        }
    }
}

static void *run_forward_job(void *arg) {
    forward_job *job = (forward_job *)arg;
    int64_t n = job->k_len, dim = job->dim, k = job->k, group = job->heads / job->kv_heads;
    int64_t blocks_per_head = (job->q_len + ROW_BLOCK - 1) / ROW_BLOCK;
    row_scratch scratch;
    float *scores = (float *)malloc(sizeof(float) * (size_t)(ROW_BLOCK * job->lk_padded));
    float *q_block = (float *)malloc(sizeof(float) * (size_t)(ROW_BLOCK * dim));
    if (!scores || !q_block || scratch_alloc(&scratch, n, k, job->groups)) {
        free(scores); free(q_block); job->status = 2; return NULL;
    }
    job->status = 0;
    for (int64_t unit = job->first; unit < job->last && !job->status; unit++) {
        int64_t bh = unit / blocks_per_head, row0 = (unit % blocks_per_head) * ROW_BLOCK;
        int64_t b = bh / job->heads, kv = b * job->kv_heads + (bh % job->heads) / group;
        int64_t rows = job->q_len - row0 < ROW_BLOCK ? job->q_len - row0 : ROW_BLOCK;
        const float *q = job->query + (bh * job->q_len + row0) * dim;
        for (int64_t r = 0; r < ROW_BLOCK; r++) {
            for (int64_t d = 0; d < dim; d++) q_block[r * dim + d] = r < rows ? q[r * dim + d] * job->scale : 0.0f;
        }
        score_block(q_block, job->key_t + kv * dim * job->lk_padded, dim, job->lk_padded, scores);
        for (int64_t r = 0; r < rows && !job->status; r++) {
            float *row = scores + r * job->lk_padded;
            if (job->key_bias) {
                const float *bias = job->key_bias + b * n;
                for (int64_t j = 0; j < n; j++) row[j] += bias[j];
            }
            if (job->causal) {
                int64_t last_key = row0 + r + (n - job->q_len);
                for (int64_t j = last_key + 1 < 0 ? 0 : last_key + 1; j < n; j++) row[j] = -INFINITY;
            }
            int64_t at = bh * job->q_len + row0 + r;
            job->status = attend_row(row, n, k, job->groups, job->value + kv * n * dim, dim,
                                     job->dropped ? job->dropped + at * k : NULL, job->keep_scale, &scratch,
                                     job->out + at * dim, job->kept_index ? job->kept_index + at * k : NULL,
                                     job->kept_prob ? job->kept_prob + at * k : NULL);
        }
    }
    free(scores);
    free(q_block);
    scratch_free(&scratch);
    return NULL;
}

/* Returns 0 on success, 1 if a score is NaN, 2 if memory ran out. */
int topk_forward_f32(const float *query, const float *key_t, const float *value, const float *key_bias,
                     const uint8_t *dropped, double keep_scale, int64_t batch, int64_t heads, int64_t kv_heads,
                     int64_t q_len, int64_t k_len, int64_t lk_padded, int64_t dim, int64_t k, int64_t groups,
                     int64_t causal, double scale, int64_t threads, float *out, int32_t *kept_index,
                     float *kept_prob) {
    int64_t units = batch * heads * ((q_len + ROW_BLOCK - 1) / ROW_BLOCK);
    threads = thread_count(threads, units);
    forward_job jobs[MAX_THREADS];
    for (int64_t t = 0; t < threads; t++) {
        jobs[t] = (forward_job){query, key_t, value, key_bias, dropped, heads, kv_heads, q_len, k_len, lk_padded,
                                dim, k, groups, causal, (float)scale, (float)keep_scale, out, kept_index, kept_prob,
                                units * t / threads, units * (t + 1) / threads, 0};
    }
    run_threads(run_forward_job, (char *)jobs, sizeof(jobs[0]), threads);
    int status = 0;
    for (int64_t t = 0; t < threads; t++) status = jobs[t].status > status ? jobs[t].status : status;
    return status;
}
