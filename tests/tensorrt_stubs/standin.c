/*
 * Stand-ins for the three TensorRT libraries the Python bindings link to
 * (libnvinfer, libnvinfer_plugin, libnvonnxparser), so that the real bindings
 * module imports on a machine without TensorRT and pybind11-stubgen can read its
 * API. Compiled once per library with -DEPROJ_NVINFER, -DEPROJ_NVINFER_PLUGIN or
 * -DEPROJ_NVONNXPARSER and the library's soname (see build.py).
 *
 * Importing the module only needs these symbols to resolve; nothing here may be
 * called to do real work: the factories return NULL and the version is 0, so a
 * Builder or Runtime made under the stand-ins fails as TensorRT does when it cannot
 * create one.
 */
#include <stddef.h>

#if defined(EPROJ_NVINFER)
void *createInferBuilder_INTERNAL(void *logger, int version) { (void)logger; (void)version; return NULL; }
void *createInferRuntime_INTERNAL(void *logger, int version) { (void)logger; (void)version; return NULL; }
void *createInferRefitter_INTERNAL(void *engine, void *logger, int version)
{
    (void)engine; (void)logger; (void)version;
    return NULL;
}
void *getPluginRegistry(void) { return NULL; }
void *getBuilderPluginRegistry(int capability) { (void)capability; return NULL; }
#elif defined(EPROJ_NVINFER_PLUGIN)
int initLibNvInferPlugins(void *logger, const char *plugin_namespace)
{
    (void)logger; (void)plugin_namespace;
    return 0;
}
#elif defined(EPROJ_NVONNXPARSER)
void *createNvOnnxParser_INTERNAL(void *network, void *logger, int version)
{
    (void)network; (void)logger; (void)version;
    return NULL;
}
void *createNvOnnxParserRefitter_INTERNAL(void *refitter, void *logger, int version)
{
    (void)refitter; (void)logger; (void)version;
    return NULL;
}
int getNvOnnxParserVersion(void) { return 0; }
#else
#error "define EPROJ_NVINFER, EPROJ_NVINFER_PLUGIN or EPROJ_NVONNXPARSER"
#endif
