"""refconv_mm: RefConv for MMDetection, MMSegmentation and MMPretrain (OpenMMLab 2.x plugin)."""
import os
import os.path as osp
import shutil

from setuptools import find_packages, setup

HERE = osp.dirname(osp.abspath(__file__))


def readme() -> str:
    with open(osp.join(HERE, 'README.md'), encoding='utf-8') as f:
        return f.read()


def version() -> str:
    scope = {}
    with open(osp.join(HERE, 'refconv_mm', 'version.py')) as f:
        exec(f.read(), scope)
    return scope['__version__']


def add_mim_extension() -> None:
    """Ship configs/ and tools/ inside the package under ``.mim``, as OpenMMLab packages do."""
    mode = 'symlink' if os.environ.get('PIP_EDITABLE_MODE') or 'develop' in os.sys.argv \
        or any('editable' in a for a in os.sys.argv) else 'copy'
    mim = osp.join(HERE, 'refconv_mm', '.mim')
    os.makedirs(mim, exist_ok=True)
    for name in ('configs', 'tools'):
        src, dst = osp.join(HERE, name), osp.join(mim, name)
        if osp.islink(dst) or osp.isfile(dst):
            os.remove(dst)
        elif osp.isdir(dst):
            shutil.rmtree(dst)
        if mode == 'symlink':
            os.symlink(osp.relpath(src, mim), dst, target_is_directory=True)
        else:
            shutil.copytree(src, dst)


if __name__ == '__main__':
    add_mim_extension()
    setup(
        name='refconv_mm',
        version=version(),
        description='RefConv (Re-parameterized Refocusing Convolution) for MMDetection, '
        'MMSegmentation and MMPretrain',
        long_description=readme(),
        long_description_content_type='text/markdown',
        license='Apache License 2.0',
        packages=find_packages(exclude=('configs', 'tools', 'tests')),
        include_package_data=True,
        package_data={'refconv_mm': ['.mim/configs/**/*', '.mim/tools/**/*']},
        python_requires='>=3.11,<3.12',
        install_requires=[
            'torch==2.13.0', 'torchvision==0.28.0', 'mmengine==0.10.7', 'mmcv==2.1.0',
            'mmdet==3.3.0', 'mmsegmentation==1.2.2', 'mmpretrain==1.2.0', 'numpy<2',
            'setuptools>=77.0.3,<82', 'ftfy', 'regex'
        ],
        extras_require=dict(tests=['pytest', 'scikit-learn', 'openmim'],
                            # README "Deploy"; requirements/deploy.txt has the same pins
                            deploy=['mmdeploy==1.3.1', 'onnx==1.17.0', 'protobuf==3.20.2',
                                    'onnxruntime==1.26.0']),
        zip_safe=False)
