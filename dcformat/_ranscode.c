/* Static rANS coder for dcz streams (spec/format.md section 7, "rANS streams").
 *
 * A C fast path for dcformat/rans.py; the Python loops there are the fallback and the reference. Python
 * parses and validates the frequency table and the stored states and produces every error message; this
 * module re-checks what it relies on (scale bound, frequencies summing to 2^scale, state bounds, symbols
 * inside the table) so that no call can make it read or write outside its buffers.
 *
 * The coding: two 32-bit states, symbol i coded by state i mod 2, renormalised by 16-bit little-endian
 * words. Encoding runs from the last symbol to the first and pushes words; the stream stores them in
 * the order the decoder reads them (the reverse), after the two final encoder states.
 *
 *   decode(words, scale, first, freqs, x0, x1, out) -> (decoded, words_used, x0, x1)
 *       words: the bytes after the two stored states (an odd trailing byte is never read); freqs: a
 *       native uint32 buffer, the frequency of symbols first, first + 1, ...; out: writable uint16 buffer
 *       of the symbol count. decoded < len(out) means a word was needed past the end (truncated).
 *   encode(symbols, scale, first, freqs) -> bytes
 *       symbols: native uint16 buffer. Returns the two final states (u32 LE each) followed by the words.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* Largest precision: the renormalisation bound freq << (32 - scale) needs scale <= 16 with 16-bit words. */
#define MAX_SCALE 16
/* Every state lies in [STATE_LOW, 2^32); it starts and must end at STATE_LOW. */
#define STATE_LOW (1u << 16)
/* Symbols are 16-bit: the table cannot reach past 65535. */
#define MAX_ALPHABET 65536

/* One decoder slot: the symbol owning the slot, the slot's offset inside the symbol's range, its frequency. */
typedef struct {
    uint16_t sym;
    uint16_t bias;
    uint32_t freq;
} slot_t;

/* Reads a contiguous native buffer of the given item size and struct format letter. */
static int
get_buffer(PyObject *obj, Py_buffer *view, int writable, Py_ssize_t itemsize, const char *letters)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0)) < 0)
        return -1;
    const char *f = view->format ? view->format : "B";
    if (*f == '@' || *f == '=' || (*f == '<' && PY_LITTLE_ENDIAN) || (*f == '>' && !PY_LITTLE_ENDIAN))
        f++;
    if (view->itemsize != itemsize || f[0] == '\0' || f[1] != '\0' || !strchr(letters, f[0])) {
        PyErr_Format(PyExc_TypeError, "expected a native %zd-byte unsigned buffer, got format '%s'", itemsize,
                     view->format);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* Checks the table: scale bound, span inside the alphabet, frequencies summing to exactly 2^scale. */
static int
check_table(int scale, Py_ssize_t first, const uint32_t *freq, Py_ssize_t span)
{
    if (scale < 1 || scale > MAX_SCALE) {
        PyErr_Format(PyExc_ValueError, "scale %d outside 1..%d", scale, MAX_SCALE);
        return -1;
    }
    if (span < 1 || first < 0 || first + span > MAX_ALPHABET) {
        PyErr_Format(PyExc_ValueError, "symbols %zd..%zd outside 0..%d", first, first + span - 1, MAX_ALPHABET - 1);
        return -1;
    }
    uint64_t total = 0;
    for (Py_ssize_t k = 0; k < span; k++)
        total += freq[k];
    if (total != (1ull << scale)) {
        PyErr_Format(PyExc_ValueError, "frequencies sum to %llu, not 2^%d", (unsigned long long)total, scale);
        return -1;
    }
    return 0;
}

/* Decodes one symbol with state x (a uint32_t lvalue) into dst[i]; on a needed word past the end, jumps to
 * label out of the loop. */
#define DECODE_ONE(x, i)                                                                   \
    do {                                                                                     \
        slot_t e_ = tab[(x) & mask];                                                         \
        dst[(i)] = e_.sym;                                                                   \
        (x) = e_.freq * ((x) >> scale) + e_.bias;                                            \
        if ((x) < STATE_LOW)                                                                 \
            (x) = ((x) << 16) | (uint32_t)(p[0] | (p[1] << 8)), p += 2;                     \
    } while (0)

static PyObject *
rans_decode(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer words, freqs, out;
    int scale;
    Py_ssize_t first;
    unsigned long long x0_in, x1_in;
    PyObject *freq_obj, *out_obj;
    if (!PyArg_ParseTuple(args, "y*inOKKO:decode", &words, &scale, &first, &freq_obj, &x0_in, &x1_in, &out_obj))
        return NULL;
    if (get_buffer(freq_obj, &freqs, 0, 4, "IL") < 0) {
        PyBuffer_Release(&words);
        return NULL;
    }
    if (get_buffer(out_obj, &out, 1, 2, "H") < 0) {
        PyBuffer_Release(&words);
        PyBuffer_Release(&freqs);
        return NULL;
    }
    PyObject *result = NULL;
    slot_t *tab = NULL;
    const uint32_t *freq = (const uint32_t *)freqs.buf;
    const Py_ssize_t span = freqs.len / 4;
    if (check_table(scale, first, freq, span) < 0)
        goto done;
    if (x0_in < STATE_LOW || x0_in > 0xFFFFFFFFull || x1_in < STATE_LOW || x1_in > 0xFFFFFFFFull) {
        PyErr_Format(PyExc_ValueError, "states %llu, %llu outside [2^16, 2^32)", x0_in, x1_in);
        goto done;
    }
    tab = PyMem_Malloc(sizeof(slot_t) << scale);
    if (!tab) {
        PyErr_NoMemory();
        goto done;
    }
    uint16_t *dst = (uint16_t *)out.buf;
    const Py_ssize_t count = out.len / 2;
    const uint8_t *p = (const uint8_t *)words.buf;
    const uint8_t *const start = p, *const end = p + (words.len & ~(Py_ssize_t)1);
    const uint32_t mask = (1u << scale) - 1;
    uint32_t x0 = (uint32_t)x0_in, x1 = (uint32_t)x1_in;
    Py_ssize_t i = 0;

    Py_BEGIN_ALLOW_THREADS
    uint32_t slot = 0;
    for (Py_ssize_t k = 0; k < span; k++) {
        for (uint32_t b = 0; b < freq[k]; b++, slot++) {
            tab[slot].sym = (uint16_t)(first + k);
            tab[slot].bias = (uint16_t)b;
            tab[slot].freq = freq[k];
        }
    }
    /* Fast loop: two symbols per round, each reads at most one word, so two words must remain. */
    while (count - i >= 2 && end - p >= 4) {
        DECODE_ONE(x0, i);
        DECODE_ONE(x1, i + 1);
        i += 2;
    }
    /* Tail: one symbol at a time; a word needed past the end stops before counting the symbol. */
    while (i < count) {
        uint32_t x = (i & 1) ? x1 : x0;
        slot_t e = tab[x & mask];
        x = e.freq * (x >> scale) + e.bias;
        if (x < STATE_LOW) {
            if (p == end)
                break;
            x = (x << 16) | (uint32_t)(p[0] | (p[1] << 8));
            p += 2;
        }
        dst[i] = e.sym;
        if (i & 1)
            x1 = x;
        else
            x0 = x;
        i++;
    }
    Py_END_ALLOW_THREADS

    result = Py_BuildValue("nnkk", i, (Py_ssize_t)((p - start) / 2), (unsigned long)x0, (unsigned long)x1);
done:
    PyMem_Free(tab);
    PyBuffer_Release(&words);
    PyBuffer_Release(&freqs);
    PyBuffer_Release(&out);
    return result;
}

/* Encodes symbols n-1 .. 0 into the words ending at *top (writing backward, when top is set), and returns
 * the number of words; or -1 - index of a symbol outside the table. */
static Py_ssize_t
encode_pass(const uint16_t *s, Py_ssize_t n, int scale, Py_ssize_t first, Py_ssize_t span, const uint32_t *freq,
            const uint32_t *cum, uint8_t *top, uint32_t *x_out)
{
    uint32_t x[2] = {STATE_LOW, STATE_LOW};
    Py_ssize_t words = 0;
    for (Py_ssize_t i = n - 1; i >= 0; i--) {
        Py_ssize_t k = (Py_ssize_t)s[i] - first;
        if (k < 0 || k >= span || freq[k] == 0)
            return -1 - i;
        uint32_t f = freq[k], xi = x[i & 1];
        if ((uint64_t)xi >= ((uint64_t)f << (32 - scale))) {
            if (top) {
                top -= 2;
                top[0] = (uint8_t)xi;
                top[1] = (uint8_t)(xi >> 8);
            }
            words++;
            xi >>= 16;
        }
        x[i & 1] = ((xi / f) << scale) + (xi % f) + cum[k];
    }
    x_out[0] = x[0];
    x_out[1] = x[1];
    return words;
}

static PyObject *
rans_encode(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer symbols, freqs;
    int scale;
    Py_ssize_t first;
    PyObject *sym_obj, *freq_obj, *result = NULL;
    if (!PyArg_ParseTuple(args, "OinO:encode", &sym_obj, &scale, &first, &freq_obj))
        return NULL;
    if (get_buffer(sym_obj, &symbols, 0, 2, "H") < 0)
        return NULL;
    if (get_buffer(freq_obj, &freqs, 0, 4, "IL") < 0) {
        PyBuffer_Release(&symbols);
        return NULL;
    }
    uint32_t *cum = NULL;
    const uint32_t *freq = (const uint32_t *)freqs.buf;
    const Py_ssize_t span = freqs.len / 4;
    if (check_table(scale, first, freq, span) < 0)
        goto done;
    cum = PyMem_Malloc(sizeof(uint32_t) * (size_t)span);
    if (!cum) {
        PyErr_NoMemory();
        goto done;
    }
    uint32_t c = 0;
    for (Py_ssize_t k = 0; k < span; k++) {
        cum[k] = c;
        c += freq[k];
    }
    const uint16_t *s = (const uint16_t *)symbols.buf;
    const Py_ssize_t n = symbols.len / 2;
    uint32_t x[2];
    /* Pass 1 sizes the output and checks every symbol; pass 2 writes. The GIL stays held so that no other
     * thread changes the symbols between the passes. */
    Py_ssize_t words = encode_pass(s, n, scale, first, span, freq, cum, NULL, x);
    if (words < 0) {
        PyErr_Format(PyExc_ValueError, "symbol at index %zd is not in the table", -1 - words);
        goto done;
    }
    PyObject *outb = PyBytes_FromStringAndSize(NULL, 8 + 2 * words);
    if (!outb)
        goto done;
    uint8_t *dst = (uint8_t *)PyBytes_AS_STRING(outb);
    encode_pass(s, n, scale, first, span, freq, cum, dst + 8 + 2 * words, x);
    for (int j = 0; j < 2; j++)
        for (int b = 0; b < 4; b++)
            dst[4 * j + b] = (uint8_t)(x[j] >> (8 * b));
    result = outb;
done:
    PyMem_Free(cum);
    PyBuffer_Release(&symbols);
    PyBuffer_Release(&freqs);
    return result;
}

static PyMethodDef methods[] = {
    {"decode", rans_decode, METH_VARARGS,
     "decode(words, scale, first, freqs, x0, x1, out) -> (decoded, words_used, x0, x1): rANS decode into out."},
    {"encode", rans_encode, METH_VARARGS,
     "encode(symbols, scale, first, freqs) -> bytes: the two final states then the 16-bit words."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "dcformat._ranscode",
    "C static rANS coder for dcz streams (fast path of dcformat.rans).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__ranscode(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m && (PyModule_AddIntConstant(m, "MAX_SCALE", MAX_SCALE) < 0 ||
              PyModule_AddIntConstant(m, "STATE_LOW", STATE_LOW) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
