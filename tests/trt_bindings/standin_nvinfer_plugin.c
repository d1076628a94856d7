/* Stand-in for libnvinfer_plugin (see standin_nvinfer.c). */
#include <stdbool.h>

bool initLibNvInferPlugins(void *logger, char const *plugin_namespace)
{
    (void)logger; (void)plugin_namespace;
    return true;
}
