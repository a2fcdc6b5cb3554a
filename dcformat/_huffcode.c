/* Canonical Huffman coder for dcz streams (spec/format.md section 6, "Huffman streams").
 *
 * A C fast path for dcformat/huffman.py; the bitarray coder there is the fallback and the reference.
 * The bitstream is MSB-first, codewords assigned canonically from (count per length, symbols in
 * canonical order), lengths 1..MAX_CODE_LENGTH. Python parses and validates the table; this module
 * re-checks what it relies on (length bound, complete code, symbol count) so that no call can make it
 * read or write outside its buffers.
 *
 *   decode(payload, counts, symbols, out) -> (decoded, used_bits)
 *       Decodes up to len(out) symbols from the bytes-like payload into the writable uint16 buffer out.
 *       decoded < len(out) means the bitstream ended first (the caller reports it as truncated).
 *   encode(values, itemsize, signed, counts, symbols, alphabet_size) -> (bitstream bytes, nbits)
 *       Codes the integers in the bytes-like values (native byte order, itemsize 1/2/4/8) and pads
 *       the last byte with zero bits.
 *
 * counts is a tuple of ints (codewords per length 1..L); symbols is a uint16 buffer in canonical order.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* Longest codeword the format allows (spec: L <= 24); also keeps a codeword inside a 32-bit window. */
#define MAX_CODE_LENGTH 24
/* Bits of the decoder's direct lookup table: 2^12 four-byte entries (16 KiB) stay in L1 cache. */
#define LUT_BITS 12
/* Largest alphabet a stream can have (symbols are stored as uint16). */
#define MAX_ALPHABET 65536

typedef struct {
    int L;                                  /* max code length, 1..MAX_CODE_LENGTH */
    uint32_t count[MAX_CODE_LENGTH + 1];    /* codewords of each length (index = length) */
    uint32_t first[MAX_CODE_LENGTH + 1];    /* first canonical codeword of each length */
    uint32_t offset[MAX_CODE_LENGTH + 1];   /* index in symbols of that first codeword */
    uint64_t limit[MAX_CODE_LENGTH + 1];    /* end of length l's codewords, left-justified in 32 bits */
    Py_ssize_t n_symbols;
} canon_t;

/* Fills c from the counts tuple; checks the length bound, completeness and the symbol count. */
static int
canon_build(PyObject *counts, Py_ssize_t n_symbols, canon_t *c)
{
    Py_ssize_t L = PyTuple_Size(counts);
    if (L < 0)
        return -1;
    if (L < 1 || L > MAX_CODE_LENGTH) {
        PyErr_Format(PyExc_ValueError, "code length %zd outside 1..%d", L, MAX_CODE_LENGTH);
        return -1;
    }
    memset(c, 0, sizeof(*c));
    c->L = (int)L;
    uint64_t kraft = 0, total = 0;
    for (Py_ssize_t l = 1; l <= L; l++) {
        unsigned long long v = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(counts, l - 1));
        if (v == (unsigned long long)-1 && PyErr_Occurred())
            return -1;
        if (v > (1ULL << l)) {
            PyErr_Format(PyExc_ValueError, "%llu codewords of length %zd", v, l);
            return -1;
        }
        c->count[l] = (uint32_t)v;
        kraft += (uint64_t)v << (L - l);
        total += v;
    }
    if (kraft != (1ULL << L) || c->count[L] == 0) {
        PyErr_SetString(PyExc_ValueError, "the code is not a complete prefix code of its max length");
        return -1;
    }
    if (total != (uint64_t)n_symbols) {
        PyErr_Format(PyExc_ValueError, "counts sum to %llu codewords, %zd symbols given",
                     (unsigned long long)total, n_symbols);
        return -1;
    }
    c->n_symbols = n_symbols;
    uint32_t code = 0, off = 0;
    for (int l = 1; l <= c->L; l++) {
        c->first[l] = code;
        c->offset[l] = off;
        c->limit[l] = (uint64_t)(code + c->count[l]) << (32 - l);
        off += c->count[l];
        code = (code + c->count[l]) << 1;
    }
    return 0;
}

/* Reads a contiguous buffer of uint16 (format 'H' in native order). */
static int
get_u16(PyObject *obj, Py_buffer *view, int writable)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0)) < 0)
        return -1;
    const char *f = view->format ? view->format : "B";
    if (*f == '@' || *f == '=' || (*f == '<' && PY_LITTLE_ENDIAN) || (*f == '>' && !PY_LITTLE_ENDIAN))
        f++;
    if (view->itemsize != 2 || strcmp(f, "H") != 0) {
        PyErr_Format(PyExc_TypeError, "expected a native uint16 buffer, got format '%s'", view->format);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static inline uint64_t
load_be64(const uint8_t *p)
{
    return ((uint64_t)p[0] << 56) | ((uint64_t)p[1] << 48) | ((uint64_t)p[2] << 40) | ((uint64_t)p[3] << 32) |
           ((uint64_t)p[4] << 24) | ((uint64_t)p[5] << 16) | ((uint64_t)p[6] << 8) | (uint64_t)p[7];
}

/* Decodes one symbol from the MSB-aligned bit buffer bb: sets len and sym. The long-code search is
 * bounded by L, and the complete code (limit[L] == 2^32) guarantees it stops at a real length. */
#define DECODE_SYMBOL(bb, len, sym)                                                         \
    do {                                                                                     \
        uint32_t e_ = lut[(bb) >> (64 - k)];                                                 \
        (len) = e_ & 0xFF;                                                                   \
        if ((len)) {                                                                         \
            (sym) = (uint16_t)(e_ >> 8);                                                     \
        } else {                                                                             \
            uint64_t w_ = (bb) >> 32;                                                        \
            int l_ = k + 1;                                                                  \
            while (l_ < c.L && w_ >= c.limit[l_])                                            \
                l_++;                                                                        \
            (len) = (unsigned)l_;                                                            \
            (sym) = syms[c.offset[l_] + (uint32_t)((w_ >> (32 - l_)) - c.first[l_])];        \
        }                                                                                    \
    } while (0)

static PyObject *
huff_decode(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer payload, symbols, out;
    PyObject *counts, *sym_obj, *out_obj;
    if (!PyArg_ParseTuple(args, "y*O!OO:decode", &payload, &PyTuple_Type, &counts, &sym_obj, &out_obj))
        return NULL;
    if (get_u16(sym_obj, &symbols, 0) < 0) {
        PyBuffer_Release(&payload);
        return NULL;
    }
    if (get_u16(out_obj, &out, 1) < 0) {
        PyBuffer_Release(&payload);
        PyBuffer_Release(&symbols);
        return NULL;
    }
    canon_t c;
    if (canon_build(counts, symbols.len / 2, &c) < 0) {
        PyBuffer_Release(&payload);
        PyBuffer_Release(&symbols);
        PyBuffer_Release(&out);
        return NULL;
    }
    const uint16_t *syms = (const uint16_t *)symbols.buf;
    uint16_t *dst = (uint16_t *)out.buf;
    const Py_ssize_t count = out.len / 2;
    const uint8_t *p = (const uint8_t *)payload.buf;
    const uint8_t *const start = p, *const end = p + payload.len;
    const int k = c.L < LUT_BITS ? c.L : LUT_BITS;
    uint32_t lut[1 << LUT_BITS];
    Py_ssize_t i = 0;
    uint64_t bb = 0; /* next bits of the stream, first bit at the MSB; bits past bc are 0 or stream bits */
    unsigned bc = 0; /* bits of bb that are loaded and not yet consumed */

    Py_BEGIN_ALLOW_THREADS
    /* Codes of up to k bits decode with one lookup; prefixes of longer codes stay 0. */
    memset(lut, 0, sizeof(uint32_t) << k);
    for (int l = 1; l <= k; l++) {
        for (uint32_t j = 0; j < c.count[l]; j++) {
            uint32_t base = (c.first[l] + j) << (k - l);
            uint32_t e = ((uint32_t)syms[c.offset[l] + j] << 8) | (uint32_t)l;
            for (uint32_t r = 0; r < (1u << (k - l)); r++)
                lut[base + r] = e;
        }
    }
    /* Fast loop: while 8 bytes can be loaded, refill to >= 56 bits and take two symbols (<= 48 bits). */
    while (count - i >= 2 && end - p >= 8) {
        bb |= load_be64(p) >> bc;
        p += (63 - bc) >> 3;
        bc |= 56;
        unsigned len;
        uint16_t sym;
        DECODE_SYMBOL(bb, len, sym);
        dst[i++] = sym;
        bb <<= len;
        bc -= len;
        DECODE_SYMBOL(bb, len, sym);
        dst[i++] = sym;
        bb <<= len;
        bc -= len;
    }
    /* Tail: byte-wise refill; a codeword longer than the bits left means the stream ended early. */
    while (i < count) {
        while (bc <= 56 && p < end) {
            bb |= (uint64_t)*p++ << (56 - bc);
            bc += 8;
        }
        unsigned len;
        uint16_t sym;
        DECODE_SYMBOL(bb, len, sym);
        if (len > bc)
            break;
        dst[i++] = sym;
        bb <<= len;
        bc -= len;
    }
    Py_END_ALLOW_THREADS

    unsigned long long used = 8ULL * (unsigned long long)(p - start) - bc;
    PyBuffer_Release(&payload);
    PyBuffer_Release(&symbols);
    PyBuffer_Release(&out);
    return Py_BuildValue("nK", i, used);
}

/* Codes n values of one integer type: pass 1 checks each is in the code and sums the bits,
 * pass 2 (when dst is set) writes them MSB-first. Returns the bit count, or -1 - index of a bad value. */
#define ENCODE_LOOP(T)                                                                       \
    static long long encode_##T(const T *v, Py_ssize_t n, const uint32_t *code,             \
                                const uint8_t *len, Py_ssize_t alphabet, uint8_t *dst)      \
    {                                                                                        \
        if (!dst) {                                                                          \
            unsigned long long bits = 0;                                                     \
            for (Py_ssize_t i = 0; i < n; i++) {                                             \
                /* a negative value converts to a huge unsigned one and fails the bound */   \
                unsigned long long x = (unsigned long long)v[i];                             \
                if (x >= (unsigned long long)alphabet || !len[x])                            \
                    return -1 - (long long)i;                                                \
                bits += len[x];                                                              \
            }                                                                                \
            return (long long)bits;                                                          \
        }                                                                                    \
        uint64_t acc = 0;                                                                    \
        unsigned nacc = 0;                                                                   \
        for (Py_ssize_t i = 0; i < n; i++) {                                                 \
            Py_ssize_t s = (Py_ssize_t)v[i];                                                 \
            acc = (acc << len[s]) | code[s];                                                 \
            nacc += len[s];                                                                  \
            if (nacc >= 32) {                                                                \
                uint32_t w = (uint32_t)(acc >> (nacc - 32));                                 \
                dst[0] = (uint8_t)(w >> 24);                                                 \
                dst[1] = (uint8_t)(w >> 16);                                                 \
                dst[2] = (uint8_t)(w >> 8);                                                  \
                dst[3] = (uint8_t)w;                                                         \
                dst += 4;                                                                    \
                nacc -= 32;                                                                  \
            }                                                                                \
        }                                                                                    \
        while (nacc >= 8) {                                                                  \
            *dst++ = (uint8_t)(acc >> (nacc - 8));                                           \
            nacc -= 8;                                                                       \
        }                                                                                    \
        if (nacc)                                                                            \
            *dst = (uint8_t)(acc << (8 - nacc));                                             \
        return 0;                                                                            \
    }

typedef int8_t i8;
typedef int16_t i16;
typedef int32_t i32;
typedef int64_t i64;
typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;
ENCODE_LOOP(i8)
ENCODE_LOOP(i16)
ENCODE_LOOP(i32)
ENCODE_LOOP(i64)
ENCODE_LOOP(u8)
ENCODE_LOOP(u16)
ENCODE_LOOP(u32)
ENCODE_LOOP(u64)

static long long
encode_any(const void *v, Py_ssize_t n, int itemsize, int is_signed, const uint32_t *code, const uint8_t *len,
           Py_ssize_t alphabet, uint8_t *dst)
{
    switch (itemsize * 2 + (is_signed != 0)) {
    case 2: return encode_u8((const u8 *)v, n, code, len, alphabet, dst);
    case 3: return encode_i8((const i8 *)v, n, code, len, alphabet, dst);
    case 4: return encode_u16((const u16 *)v, n, code, len, alphabet, dst);
    case 5: return encode_i16((const i16 *)v, n, code, len, alphabet, dst);
    case 8: return encode_u32((const u32 *)v, n, code, len, alphabet, dst);
    case 9: return encode_i32((const i32 *)v, n, code, len, alphabet, dst);
    case 16: return encode_u64((const u64 *)v, n, code, len, alphabet, dst);
    default: return encode_i64((const i64 *)v, n, code, len, alphabet, dst);
    }
}

static PyObject *
huff_encode(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer values, symbols;
    PyObject *counts, *sym_obj, *result = NULL;
    int itemsize, is_signed;
    Py_ssize_t alphabet;
    if (!PyArg_ParseTuple(args, "y*ipO!On:encode", &values, &itemsize, &is_signed, &PyTuple_Type, &counts,
                          &sym_obj, &alphabet))
        return NULL;
    uint32_t *code = NULL;
    uint8_t *len = NULL;
    if (get_u16(sym_obj, &symbols, 0) < 0) {
        PyBuffer_Release(&values);
        return NULL;
    }
    if (itemsize != 1 && itemsize != 2 && itemsize != 4 && itemsize != 8) {
        PyErr_Format(PyExc_ValueError, "itemsize %d is not 1, 2, 4 or 8", itemsize);
        goto done;
    }
    if (values.len % itemsize) {
        PyErr_Format(PyExc_ValueError, "%zd bytes is not a whole number of %d-byte values", values.len, itemsize);
        goto done;
    }
    if (alphabet < 1 || alphabet > MAX_ALPHABET) {
        PyErr_Format(PyExc_ValueError, "alphabet size %zd outside 1..%d", alphabet, MAX_ALPHABET);
        goto done;
    }
    canon_t c;
    if (canon_build(counts, symbols.len / 2, &c) < 0)
        goto done;
    code = PyMem_Calloc((size_t)alphabet, sizeof(uint32_t));
    len = PyMem_Calloc((size_t)alphabet, 1);
    if (!code || !len) {
        PyErr_NoMemory();
        goto done;
    }
    const uint16_t *syms = (const uint16_t *)symbols.buf;
    for (int l = 1; l <= c.L; l++) {
        for (uint32_t j = 0; j < c.count[l]; j++) {
            uint16_t s = syms[c.offset[l] + j];
            if (s >= alphabet || len[s]) {
                PyErr_Format(PyExc_ValueError, "table symbol %u is outside the alphabet of %zd or repeated",
                             (unsigned)s, alphabet);
                goto done;
            }
            code[s] = c.first[l] + j;
            len[s] = (uint8_t)l;
        }
    }
    Py_ssize_t n = values.len / itemsize;
    /* The GIL stays held: pass 2 trusts pass 1's checks, so no other thread may change values between them. */
    long long bits = encode_any(values.buf, n, itemsize, is_signed, code, len, alphabet, NULL);
    if (bits < 0) {
        PyErr_Format(PyExc_ValueError, "value at index %lld is not a symbol of the code", -1 - bits);
        goto done;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)((bits + 7) / 8));
    if (!out)
        goto done;
    uint8_t *dst = (uint8_t *)PyBytes_AS_STRING(out);
    encode_any(values.buf, n, itemsize, is_signed, code, len, alphabet, dst);
    result = Py_BuildValue("NL", out, bits);
done:
    PyMem_Free(code);
    PyMem_Free(len);
    PyBuffer_Release(&values);
    PyBuffer_Release(&symbols);
    return result;
}

static PyMethodDef methods[] = {
    {"decode", huff_decode, METH_VARARGS,
     "decode(payload, counts, symbols, out) -> (decoded, used_bits): canonical Huffman decode into out."},
    {"encode", huff_encode, METH_VARARGS,
     "encode(values, itemsize, signed, counts, symbols, alphabet_size) -> (bitstream, nbits)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "dcformat._huffcode",
    "C canonical Huffman coder for dcz streams (fast path of dcformat.huffman).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__huffcode(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m && (PyModule_AddIntConstant(m, "MAX_CODE_LENGTH", MAX_CODE_LENGTH) < 0 ||
              PyModule_AddIntConstant(m, "LUT_BITS", LUT_BITS) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
