/* Stand-in for libnvinfer: the C entry points NVIDIA's Python bindings link against (found with
 * `nm -D --undefined-only tensorrt_bindings/tensorrt.so`). Every factory returns NULL, as the real ones do
 * when CUDA cannot start, so the real bindings import and report that condition their own way. */
#include <stddef.h>
#include <stdint.h>

void *createInferBuilder_INTERNAL(void *logger, int32_t version) { (void)logger; (void)version; return NULL; }
void *createInferRuntime_INTERNAL(void *logger, int32_t version) { (void)logger; (void)version; return NULL; }
void *createInferRefitter_INTERNAL(void *engine, void *logger, int32_t version)
{
    (void)engine; (void)logger; (void)version;
    return NULL;
}
void *getBuilderPluginRegistry(int32_t capability) { (void)capability; return NULL; }
void *getPluginRegistry(void) { return NULL; }
